"""Where a job's retriever runs: ``retriever.placement`` (cpu | dedicated | shared), one decision for every job
that starts a retriever (train, evaluate, retriever_check).

- ``cpu``: the retriever process sees no GPU (``CUDA_VISIBLE_DEVICES=""``), its encoder and index are on the
  CPU; it creates no CUDA context and holds no GPU memory.
- ``dedicated``: the job asks for ``retriever.gpus`` GPUs more than its own work needs; the retriever sees only
  those (the last ones of the job's GPUs), slime's Ray head (or the evaluation's SGLang server) only the others.
- ``shared``: the index is sharded in fp16 over the job's own GPUs, next to slime / SGLang, as slime's
  Search-R1 example does (``--faiss_gpu`` over every GPU of the node). What that takes per GPU is computed from
  the budget facts and must fit in what SGLang's static share leaves, less a margin: checked by the plan
  (``snakemake -n``, ``searchr1 plan``) against ``budget.gpu_memory_gb`` and by the job against the real GPUs
  before slime or SGLang starts.

GPU ids are those the job sees: SLURM's ``CUDA_VISIBLE_DEVICES`` for the allocation, else 0..N-1. Every function
reads only the settings the job declares (see rules/common.smk).
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PLACEMENTS = ("cpu", "dedicated", "shared")
JOBS = ("train", "evaluate", "retriever_check", "toy_warm_start")
# Jobs whose only GPU user would be the retriever: under shared they shard over as many GPUs as training does.
RETRIEVER_ONLY_JOBS = ("retriever_check", "toy_warm_start")
MB = 1024**2
GB = 1e9


class PlacementError(RuntimeError):
    """The retriever cannot be placed as configured; the message names the setting and the numbers."""


def starts_retriever(cfg: Mapping[str, Any]) -> bool:
    """False when ``retriever.url`` points at a running server: the jobs start none, placement does not apply."""
    return not cfg["retriever"]["url"]


def placement(cfg: Mapping[str, Any]) -> str:
    return cfg["retriever"]["placement"] if starts_retriever(cfg) else "url"


def compute_gpus(cfg: Mapping[str, Any], job: str) -> int:
    """GPUs per node of the job's own work (slime / the torch trainer / the evaluation engine); the check has none."""
    if job == "train":
        train = cfg["train"]
        return train["slime"]["gpus_per_node"] if train["backend"] == "slime" else train["resources"]["gpus"]
    if job == "evaluate":
        return cfg["eval"]["resources"]["gpus"]
    if job in RETRIEVER_ONLY_JOBS:
        return 0
    raise ValueError(f"unknown job {job!r} (known: {', '.join(JOBS)})")


def retriever_gpus(cfg: Mapping[str, Any], job: str) -> int:
    """How many GPUs the job's retriever sees: 0 on the CPU; its own under dedicated; under shared the job's
    GPUs (the check shards over as many as training does, so it loads the shards the train job will)."""
    where = placement(cfg)
    if where in ("cpu", "url"):
        return 0
    if where == "dedicated":
        return cfg["retriever"]["gpus"]
    return compute_gpus(cfg, "train" if job in RETRIEVER_ONLY_JOBS else job)


def job_gpus(cfg: Mapping[str, Any], job: str) -> int:
    """GPUs the job asks for, per node: its own work's, plus the retriever's under dedicated (or, for the check,
    the retriever's alone)."""
    own = compute_gpus(cfg, job)
    extra = cfg["retriever"]["gpus"] if placement(cfg) == "dedicated" else 0
    if job in RETRIEVER_ONLY_JOBS:
        return retriever_gpus(cfg, job)
    return own + extra


@dataclass(frozen=True)
class GpuAssignment:
    """GPU ids (as CUDA_VISIBLE_DEVICES entries) of the job's own work and of its retriever ([] = the CPU)."""

    compute: list[str]
    retriever: list[str]


def visible_gpus(env: Mapping[str, str], needed: int) -> list[str]:
    """The job's GPU ids: ``CUDA_VISIBLE_DEVICES`` when set (SLURM sets it for a GPU allocation; "" = none),
    else 0..needed-1."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return [str(i) for i in range(needed)]
    return [part.strip() for part in raw.split(",") if part.strip()]


def assign_gpus(cfg: Mapping[str, Any], job: str, env: Mapping[str, str]) -> GpuAssignment:
    """Split the job's GPUs between its own work and its retriever as ``retriever.placement`` says."""
    own, ret = compute_gpus(cfg, job), retriever_gpus(cfg, job)
    where = placement(cfg)
    needed = job_gpus(cfg, job)
    ids = visible_gpus(env, needed)
    if len(ids) < needed:
        raise PlacementError(
            f"{job}: retriever.placement {where!r} needs {needed} GPU(s) in this job ({own} for its own work"
            f"{f' + {ret} for the retriever' if where == 'dedicated' else ''}), but it sees {len(ids)} "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    compute = ids[:own]
    if where == "dedicated":
        return GpuAssignment(compute, ids[own : own + ret])
    if where == "shared":
        return GpuAssignment(compute, ids[:ret])
    return GpuAssignment(compute, [])


def retriever_process(cfg: Mapping[str, Any], gpus: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Extra ``serve`` flags and environment that put the retriever on ``gpus`` ([] = the CPU).

    On the CPU the process sees no GPU at all and its encoder and index are asked for on the CPU. On GPUs it
    sees only its own; under shared the torch backend is used, the layout whose memory the check accounts for.
    """
    env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    if not gpus:
        return ["--device", "cpu", "--index-device", "cpu"], env
    args = ["--device", "cuda:0"]
    if placement(cfg) == "shared":
        args += ["--backend", "torch"]
    return args, env


# --- memory of the shared layout ----------------------------------------------------------------------------


def shared_need(cfg: Mapping[str, Any], n_gpus: int) -> dict[str, float]:
    """Bytes the retriever holds on the busiest of ``n_gpus`` GPUs under shared: its fp16 index shard, the
    torch backend's per-GPU overhead (CUDA context, score buffer) and, on the first GPU, the query encoder."""
    b = cfg["budget"]
    shard = math.ceil(b["corpus_passages"] / n_gpus) * b["embedding_dim"] * 2
    overhead = b["retriever_gpu_overhead_mb"] * MB
    encoder = b["retriever_encoder_gpu_mb"] * MB
    return {"shard": shard, "overhead": overhead, "encoder": encoder, "per_gpu": shard + overhead + encoder}


def shared_room(cfg: Mapping[str, Any], gpu_bytes: float) -> float:
    """What SGLang's static share leaves on a GPU of ``gpu_bytes``, less the colocate margin."""
    fraction = cfg["train"]["slime"]["sglang_mem_fraction_static"]
    return (1 - fraction) * gpu_bytes - cfg["budget"]["colocate_margin_gb"] * GB


def check_shared_fit(cfg: Mapping[str, Any], job: str, gpu_bytes: Sequence[float], *, source: str) -> dict:
    """Refuse (PlacementError) when the shared retriever does not fit beside SGLang on the smallest GPU.

    ``gpu_bytes``: total memory of each GPU the retriever shares; ``source`` says where the figures come from.
    Returns the figures of the check (for logs and the plan).
    """
    n = len(gpu_bytes)
    if n == 0:
        raise PlacementError(f"{job}: retriever.placement 'shared' needs GPUs to share, and the job has none")
    need = shared_need(cfg, n)
    smallest = min(gpu_bytes)
    room = shared_room(cfg, smallest)
    figures = {"gpus": n, "gpu_bytes": smallest, "need_per_gpu": need["per_gpu"], "room_per_gpu": room, **need}
    if need["per_gpu"] > room:
        fraction = cfg["train"]["slime"]["sglang_mem_fraction_static"]
        raise PlacementError(
            f"{job}: retriever.placement 'shared' does not fit: the retriever needs {need['per_gpu'] / GB:.1f} GB "
            f"on a GPU ({need['shard'] / GB:.1f} GB fp16 index shard of {cfg['budget']['corpus_passages']:,} x "
            f"{cfg['budget']['embedding_dim']} over {n} GPU(s), {need['overhead'] / GB:.1f} GB CUDA context and "
            f"score buffer, {need['encoder'] / GB:.1f} GB query encoder), but a {smallest / GB:.1f} GB GPU "
            f"({source}) leaves {room / GB:.1f} GB beside SGLang (1 - sglang_mem_fraction_static {fraction} of it, "
            f"less budget.colocate_margin_gb {cfg['budget']['colocate_margin_gb']}). Use retriever.placement "
            f"'dedicated' (with retriever.gpus) or 'cpu', more GPUs, or a lower sglang_mem_fraction_static"
        )
    return figures


def plan_check(cfg: Mapping[str, Any]) -> list[str]:
    """Problems of the placement the plan can see: shared must fit on ``budget.gpu_memory_gb`` GPUs beside SGLang
    in the train job (slime) and in the SGLang evaluation. Empty when it fits or does not apply."""
    if placement(cfg) != "shared":
        return []
    problems = []
    gpu = cfg["budget"]["gpu_memory_gb"] * GB
    jobs = []
    if cfg["train"]["backend"] == "slime":
        jobs.append("train")
    if cfg["eval"]["engine"] == "sglang":
        jobs.append("evaluate")
    for job in jobs:
        n = retriever_gpus(cfg, job)
        try:
            check_shared_fit(cfg, job, [gpu] * n, source="budget.gpu_memory_gb")
        except PlacementError as e:
            problems.append(str(e))
    return problems


def gpu_total_bytes(ids: Sequence[str], *, run=subprocess.run) -> list[float]:
    """Total memory of each GPU in ``ids`` (CUDA_VISIBLE_DEVICES entries) from nvidia-smi: no CUDA context."""
    out = run(
        ["nvidia-smi", f"--id={','.join(ids)}", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    values = [float(line) * MB for line in out.split() if line.strip()]
    if len(values) != len(ids):
        raise PlacementError(f"nvidia-smi reported {len(values)} GPU(s) for ids {list(ids)}: {out!r}")
    return values


def describe(cfg: Mapping[str, Any], job: str) -> str:
    """One line for the job's message and the plan: where its retriever runs and what that costs."""
    where = placement(cfg)
    if where == "url":
        return f"retriever: the running server at {cfg['retriever']['url']} (retriever.url; none started)"
    if where == "cpu":
        return "retriever: on the CPU (placement cpu: CUDA_VISIBLE_DEVICES='', no GPU memory)"
    own = compute_gpus(cfg, job)
    n = retriever_gpus(cfg, job)
    if where == "dedicated":
        ids = ",".join(str(i) for i in range(own, own + n))
        return (
            f"retriever: on {n} dedicated GPU(s) (placement dedicated: the job's GPU(s) {ids}"
            + (f"; its own work sees only {','.join(str(i) for i in range(own))}" if own else "")
            + ")"
        )
    need = shared_need(cfg, n)
    return (
        f"retriever: sharded over the job's {n} GPU(s) (placement shared): up to {need['per_gpu'] / GB:.1f} GB "
        f"per GPU ({need['shard'] / GB:.1f} GB fp16 shard + {need['overhead'] / GB:.1f} GB overhead + "
        f"{need['encoder'] / GB:.1f} GB encoder on the first)"
    )
