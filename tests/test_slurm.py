"""The toy DAG on a real SLURM cluster through profiles/slurm (a local one-node cluster: slurmctld, slurmd,
slurmdbd with MariaDB, munge), checked with sacct against the job counts of the DAG itself.

Needs root and Debian/Ubuntu with apt (it apt-installs slurm-wlm, slurmdbd, munge and mariadb-server if
missing) and about 8 minutes on 2 cores (the toy DAG with tests/slurm/config.slurm-test.yaml on top: the same
17 jobs with less work in each), so it runs only when asked:

    SLURM_TEST=1 .venv/bin/python -m pytest tests/test_slurm.py

CI (.ci/run) asks for it when it runs as root with a working apt. It is the same as running
``SLURM_TEST_OVERLAY=tests/slurm/config.slurm-test.yaml tests/slurm/run_toy_on_slurm.sh`` by hand; that script
starts the cluster, runs the DAG, checks sacct and stops the daemons it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "slurm" / "run_toy_on_slurm.sh"
OVERLAY = ROOT / "tests" / "slurm" / "config.slurm-test.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SLURM_TEST") != "1",
        reason="set SLURM_TEST=1 to start a local SLURM cluster (needs root and apt on Debian/Ubuntu, ~8 min)",
    ),
]


def test_toy_dag_completes_under_slurm(tmp_path: Path) -> None:
    workdir = tmp_path / "wf"
    env = {**os.environ, "PYTHON": sys.executable, "SLURM_TEST_OVERLAY": str(OVERLAY)}
    res = subprocess.run(["bash", str(SCRIPT), str(workdir)], capture_output=True, text=True, timeout=3600, env=env)
    assert res.returncode == 0, f"{SCRIPT.name} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    run = json.loads((workdir / "slurm_run.json").read_text())
    assert run["snakemake_rc"] == 0 and run["not_completed"] == 0
    rules = run["rules"]
    # Every job of the DAG finished once, on SLURM or (localrule) on the submit host; sacct lists the SLURM ones.
    assert all(r["finished"] == r["dag"] == r["slurm"] + r["local"] and r["local"] >= 0 for r in rules.values()), rules
    assert run["sacct_jobs"] == run["submitted"] == sum(r["slurm"] for r in rules.values())
    assert rules["train"] == {"dag": 1, "finished": 1, "slurm": 1, "local": 0}
    assert rules["evaluate"]["slurm"] == rules["evaluate"]["dag"] > 1
    assert rules["report"] == {"dag": 1, "finished": 1, "slurm": 0, "local": 1}  # a local rule: the submit host
    table = (workdir / "sacct.txt").read_text()
    assert "rule_train" in table and "rule_evaluate" in table and "COMPLETED" in table
    assert "rule_report" not in table
    headline = (workdir / "results" / "headline.md").read_text()
    assert "HotpotQA" in headline
