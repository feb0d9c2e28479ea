import subprocess
import sys
import time
from pathlib import Path

import pytest

# Test helpers (hub server, slime stand-in, settings builders) live beside the tests, imported by bare name.
sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402
from helpers import copy_workflow, snakemake_cmd  # noqa: E402


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """The toy DAG run once per test session from a fresh copy of the workflow (the end-to-end tests check its
    results; the rerun tests change settings on it)."""
    wf = copy_workflow(tmp_path_factory.mktemp("toy") / "wf")
    start = time.monotonic()
    res = subprocess.run(snakemake_cmd("results/headline.md"), cwd=wf, capture_output=True, text=True, timeout=2700)
    elapsed = time.monotonic() - start
    (wf / "snakemake.out").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"toy DAG failed after {elapsed:.0f} s:\n{res.stderr[-6000:]}"
    (wf / "elapsed_s").write_text(f"{elapsed:.1f}\n")
    return wf


@pytest.fixture(scope="session")
def grpo_world(tmp_path_factory) -> tuple[Path, Path]:
    """The GRPO tests' tiny warm-started policy and training parquet (helpers.grpo_world), built once."""
    return helpers.grpo_world(tmp_path_factory.mktemp("grpo_world"))
