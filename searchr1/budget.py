"""The run's budget before anything starts: disk per artifact, GPUs, CPUs, memory and wall time per job.

Every disk number is derived from the config: the policy's parameter count (counted from the Megatron
architecture slime is given, ``slime_launch.MODEL_ARGS``, or ``budget.policy_params``), checkpoint retention
(``train.keep_checkpoints``, ``train.save_interval``, ``train.save_hf_interval``), the corpus size
(``budget.corpus_passages`` x bytes per passage; the Flat index is passages x ``embedding_dim`` float32) and
the number of evaluation questions; ``budget`` holds the per-unit facts. Printed by ``searchr1 plan`` and at
the start of every ``snakemake`` run (``-n`` included). The train and index jobs call
:func:`require_free_disk` before they write anything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchr1.experiments import runs, train_seeds

GB = 1e9


class DiskBudgetError(RuntimeError):
    """A job would not fit on its disk; the message names the directory and the numbers."""


@dataclass(frozen=True)
class Artifact:
    step: str
    what: str
    where: str  # the directory it lands in
    bytes: float  # the most it holds at once (peak, e.g. the download parts before concatenation)
    note: str = ""


@dataclass(frozen=True)
class Job:
    rule: str
    count: int
    gpus: int
    cpus: int
    mem_mb: int
    runtime_min: int


def _flag(args: list[str], name: str) -> int:
    return int(args[args.index(name) + 1])


def count_params(model_args: list[str]) -> int:
    """Parameters of a Qwen2-style decoder from its Megatron flags (GQA attention with q/k/v biases, SwiGLU
    MLP, RMSNorm; tied embeddings unless --untie-embeddings-and-output-weights)."""
    layers, hidden = _flag(model_args, "--num-layers"), _flag(model_args, "--hidden-size")
    ffn, heads = _flag(model_args, "--ffn-hidden-size"), _flag(model_args, "--num-attention-heads")
    groups, vocab = _flag(model_args, "--num-query-groups"), _flag(model_args, "--vocab-size")
    kv = groups * (hidden // heads)
    attention = hidden * hidden * 2 + 2 * hidden * kv + (hidden + 2 * kv if "--add-qkv-bias" in model_args else 0)
    per_layer = attention + 3 * hidden * ffn + 2 * hidden
    embeddings = vocab * hidden * (2 if "--untie-embeddings-and-output-weights" in model_args else 1)
    return layers * per_layer + embeddings + hidden


def policy_params(cfg: Mapping[str, Any]) -> int:
    if cfg["budget"]["policy_params"] is not None:
        return int(cfg["budget"]["policy_params"])
    from searchr1.slime_launch import model_args_for

    return count_params(model_args_for(cfg["policy"]["repo"]))


def corpus_passages(cfg: Mapping[str, Any]) -> int:
    return int(cfg["budget"]["corpus_passages"])


def index_bytes(cfg: Mapping[str, Any]) -> float:
    """The Flat index: passages x embedding_dim float32."""
    return corpus_passages(cfg) * cfg["budget"]["embedding_dim"] * 4


def eval_questions(cfg: Mapping[str, Any]) -> int:
    """Questions over the evaluated splits (per model)."""
    total = 0
    for split in cfg["eval"]["splits"]:
        rows = cfg["data"]["splits"][split]["expected_rows"]
        if rows is None:  # the toy's generated splits; at full scale a split without a count is not counted
            rows = cfg["toy"]["test_per_split"] if "toy" in cfg else 0
        if cfg["eval"]["max_questions"]:
            rows = min(rows, cfg["eval"]["max_questions"])
        total += rows
    return total


def uses_container(cfg: Mapping[str, Any]) -> bool:
    slime = cfg["train"]["slime"]
    needs = cfg["train"]["backend"] == "slime" or cfg["eval"]["engine"] == "sglang"
    return needs and slime["container_runtime"] != "none"


def saves(cfg: Mapping[str, Any]) -> int:
    """Checkpoints written over the run: every save_interval rollouts, and after the last one."""
    n, every = cfg["train"]["num_rollout"], cfg["train"]["save_interval"]
    return n // every + (1 if n % every else 0)


def kept_exports(cfg: Mapping[str, Any]) -> int:
    """HF exports kept at the end: one per save_hf_interval rollouts, plus the final one."""
    n, every = cfg["train"]["num_rollout"], cfg["train"]["save_hf_interval"]
    if every is None:
        return 1
    return n // every + (1 if n % every else 0)


def train_bytes(cfg: Mapping[str, Any]) -> dict[str, float]:
    """What the train job holds under <work_dir>/train at its peak."""
    b, train = cfg["budget"], cfg["train"]
    params = policy_params(cfg)
    checkpoint = params * b["checkpoint_bytes_per_param"]
    export = params * b["export_bytes_per_param"]
    # A new checkpoint is complete before the oldest is deleted: keep + 1 at the peak.
    checkpoints = min(train["keep_checkpoints"] + 1, saves(cfg))
    # slime writes an HF export at every save: the kept ones, plus the newest between two saves (deleted at
    # the next one when off-interval). The torch backend writes only the kept ones.
    exports = min(kept_exports(cfg) + (1 if train["backend"] == "slime" else 0), saves(cfg))
    return {
        "checkpoint": checkpoint,
        "checkpoints": checkpoints * checkpoint,
        "n_checkpoints": checkpoints,
        "export": export,
        "exports": exports * export,
        "n_exports": exports,
    }


def artifacts(cfg: Mapping[str, Any]) -> list[Artifact]:
    b = cfg["budget"]
    data, work = cfg["data_dir"], cfg["work_dir"]
    toy = cfg["scale"] == "toy"
    passages = corpus_passages(cfg)
    corpus = passages * b["corpus_bytes_per_passage"]
    index = index_bytes(cfg)
    params = policy_params(cfg)
    export = params * b["export_bytes_per_param"]
    out = [
        Artifact("toy_world" if toy else "download_qa", "QA data (+ prepared splits)", f"{data}/qa", b["qa_mb"] * 1e6),
        Artifact(
            "toy_world" if toy else "download_corpus",
            f"corpus, {passages:,} passages",
            f"{data}/corpus",
            corpus * (1 if toy else 1 + b["corpus_gz_ratio"]),
            "" if toy else "peak with the .gz; then the JSONL",
        ),
        Artifact("corpus_offsets", "passage offsets", f"{data}/corpus", passages * 8),
    ]
    if cfg["retriever"]["index"]["source"] == "download" and not toy:
        out.append(
            Artifact(
                "download_index",
                f"Flat index {passages:,} x {b['embedding_dim']} fp32",
                f"{data}/index",
                2 * index,
                "peak: parts + concatenated; then half",
            )
        )
    else:
        out.append(
            Artifact("build_index", f"Flat index {passages:,} x {b['embedding_dim']} fp32", f"{data}/index", index)
        )
    out.append(Artifact("fetch_encoder", "encoder", f"{data}/models", b["encoder_mb"] * 1e6))
    out.append(
        Artifact(
            "toy_warm_start" if toy else "download_policy",
            f"base policy, {params / 1e9:.3g}B params",
            f"{data}/models",
            export,
        )
    )
    if uses_container(cfg):
        out.append(
            Artifact(
                "container_image",
                f"slime image ({cfg['train']['slime']['container_runtime']})",
                f"{work}/images",
                b["image_gb"] * GB,
            )
        )
    t = train_bytes(cfg)
    keep, every = cfg["train"]["keep_checkpoints"], cfg["train"]["save_hf_interval"]
    # every run (experiments x train.seeds) keeps its own checkpoints and exports: they add up
    n_runs = len(runs(cfg))
    per_run = "" if n_runs == 1 else f" per run x {n_runs} runs"
    train_where = f"{work}/train" if n_runs == 1 else f"{work}/runs"
    out.append(
        Artifact(
            "train",
            f"checkpoints: keep {keep} (+1 while saving) x {t['checkpoint'] / GB:.3g} GB{per_run}",
            train_where,
            t["checkpoints"] * n_runs,
        )
    )
    out.append(
        Artifact(
            "train",
            f"HF exports: {'every ' + str(every) + ' rollouts + final' if every else 'final'}"
            f", {t['n_exports']} x {t['export'] / GB:.3g} GB{per_run}",
            train_where,
            t["exports"] * n_runs,
        )
    )
    out.append(
        Artifact(
            "export_rl",
            "RL policy (HF)" + ("" if n_runs == 1 else f" x {n_runs} runs"),
            "results/models/rl" if n_runs == 1 else "results/runs",
            export * n_runs,
        )
    )
    questions = eval_questions(cfg)
    models = 1 + n_runs + len(cfg["eval"]["models"])  # base, every run's RL model and eval.models
    out.append(
        Artifact(
            "evaluate",
            f"{models} models x {questions:,} questions",
            f"{work}/eval + results/eval",
            models * questions * b["eval_kb_per_question"] * 1e3,
        )
    )
    return out


def need_bytes(cfg: Mapping[str, Any], step: str) -> float:
    """The disk a step writes, with the margin; reads only the keys that step's rule declares."""
    b = cfg["budget"]
    if step == "train":
        t = train_bytes(cfg)
        raw = t["checkpoints"] + t["exports"]
    elif step == "download_index":
        raw = 2 * index_bytes(cfg)  # the parts and the concatenated index, until the parts are deleted
    elif step == "build_index":
        raw = index_bytes(cfg)
    elif step == "container_image":
        raw = b["image_gb"] * GB
    else:
        raise ValueError(f"no disk check for step {step!r}")
    return b["margin"] * raw


def jobs(cfg: Mapping[str, Any]) -> list[Job]:
    """GPU, CPU, memory and time requests of the GPU and long jobs (the rules' resources come from the same
    keys; rules/common.smk)."""
    from searchr1.retrieval.placement import job_gpus

    res, train, ev = cfg["resources"], cfg["train"], cfg["eval"]
    nodes = train["slime"]["nodes"] if train["backend"] == "slime" else 1
    rows = []
    if cfg["scale"] != "toy":
        rows += [
            Job(
                "download_* (each)",
                5,
                0,
                res["download"]["cpus"],
                res["download"]["mem_mb"],
                res["download"]["runtime_min"],
            )
        ]
    if cfg["retriever"]["index"]["source"] == "build" or cfg["scale"] == "toy":
        ib = res["index_build"]
        rows.append(Job("build_index", 1, ib["gpus"], ib["cpus"], ib["mem_mb"], ib["runtime_min"]))
    rc = res["retriever_check"]
    rows.append(
        Job("retriever_check", 1, job_gpus(cfg, "retriever_check"), rc["cpus"], rc["mem_mb"], rc["runtime_min"])
    )
    if uses_container(cfg):
        d = res["download"]
        rows.append(Job("container_image", 1, 0, d["cpus"], d["mem_mb"], d["runtime_min"]))
    tr = train["resources"]
    n_runs = len(runs(cfg))  # one train job per run (experiments x train.seeds)
    rows.append(Job("train", n_runs, nodes * job_gpus(cfg, "train"), tr["cpus"], tr["mem_mb"], tr["runtime_min"]))
    er = ev["resources"]
    rows.append(
        Job(
            "evaluate",
            (1 + n_runs + len(ev["models"])) * len(ev["splits"]),
            job_gpus(cfg, "evaluate"),
            er["cpus"],
            er["mem_mb"],
            er["runtime_min"],
        )
    )
    return rows


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB" if n >= 0.05 * GB else f"{n / 1e6:,.1f} MB"


def format_plan(cfg: Mapping[str, Any]) -> str:
    lines = [
        f"Budget of this run (scale {cfg['scale']}; data_dir {cfg['data_dir']}, work_dir {cfg['work_dir']}):",
        "",
        "  disk (peak per artifact, without the margin)",
    ]
    arts = artifacts(cfg)
    width = max(len(a.step) for a in arts)
    for a in arts:
        note = f"  ({a.note})" if a.note else ""
        lines.append(f"    {a.step:<{width}}  {_gb(a.bytes):>11}  {a.what} -> {a.where}{note}")
    by_root: dict[str, float] = {}
    for a in arts:
        root = (
            "work_dir"
            if a.where.startswith(str(cfg["work_dir"]))
            else ("data_dir" if a.where.startswith(str(cfg["data_dir"])) else "results")
        )
        by_root[root] = by_root.get(root, 0.0) + a.bytes
    total = sum(by_root.values())
    lines.append(
        f"    {'total':<{width}}  {_gb(total):>11}  ("
        + ", ".join(f"{k} {_gb(v)}" for k, v in by_root.items())
        + f"); with margin x{cfg['budget']['margin']}: {_gb(total * cfg['budget']['margin'])}"
    )
    n_runs = len(runs(cfg))
    if n_runs > 1:
        names = list(cfg["experiments"])
        lines += [
            "",
            f"  runs: {n_runs} = {len(names)} experiment(s) ({', '.join(names)}) x {len(train_seeds(cfg))} "
            f"training seed(s) ({', '.join(map(str, train_seeds(cfg)))})",
        ]
    lines += ["", "  jobs (GPUs, CPUs, memory, wall-time request each)"]
    all_jobs = jobs(cfg)
    for j in all_jobs:
        count = f" x{j.count}" if j.count > 1 else ""
        lines.append(
            f"    {j.rule + count:<{width + 4}}  {j.gpus} GPU  {j.cpus} CPU  {j.mem_mb / 1000:,.0f} GB RAM  "
            f"{j.runtime_min / 60:,.1f} h"
        )
    gpu_hours = sum(j.count * j.gpus * j.runtime_min / 60 for j in all_jobs)
    train_hours = sum(j.count * j.gpus * j.runtime_min / 60 for j in all_jobs if j.rule == "train")
    lines.append(
        f"    GPU-hours requested: {gpu_hours:,.0f} in all, {train_hours:,.0f} of them training "
        f"({n_runs} run{'s' if n_runs > 1 else ''}; requests are upper bounds)"
    )
    lines += ["", f"  retriever placement: {cfg['retriever']['placement'] if not cfg['retriever']['url'] else 'url'}"]
    lines += placement_lines(cfg)
    return "\n".join(lines)


def placement_lines(cfg: Mapping[str, Any]) -> list[str]:
    """Where each job's retriever runs; under shared, its memory per GPU against what SGLang leaves on a
    ``budget.gpu_memory_gb`` GPU (the check the jobs repeat on their real GPUs)."""
    from searchr1.retrieval.placement import GB, check_shared_fit, describe, placement, retriever_gpus

    lines = [f"    {job:<16}{describe(cfg, job)}" for job in ("train", "evaluate", "retriever_check")]
    if placement(cfg) == "shared":
        gpu = cfg["budget"]["gpu_memory_gb"] * GB
        beside_sglang = [("train", cfg["train"]["backend"] == "slime"), ("evaluate", cfg["eval"]["engine"] == "sglang")]
        for job, applies in beside_sglang:
            if not applies:
                continue
            n = retriever_gpus(cfg, job)
            try:
                f = check_shared_fit(cfg, job, [gpu] * n, source="budget.gpu_memory_gb")
                lines.append(
                    f"    {job}: {f['need_per_gpu'] / GB:.1f} GB per GPU fits in the {f['room_per_gpu'] / GB:.1f} GB "
                    f"SGLang leaves on a {gpu / GB:.0f} GB GPU (checked again on the job's GPUs)"
                )
            except Exception as e:  # the plan shows it; rules/common.smk and `searchr1 plan` refuse
                lines.append(f"    {job}: DOES NOT FIT: {e}")
    return lines


def existing_bytes(path: str | Path) -> int:
    """Bytes already under ``path`` (what a resumed job has written before: not needed again)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def require_free_disk(
    cfg: Mapping[str, Any], step: str, directory: str | Path, *, disk_usage=shutil.disk_usage
) -> None:
    """Refuse to start ``step`` when the free space of ``directory``'s filesystem is below what the step will
    still write (its budget with the margin, less what a previous attempt already wrote there)."""
    if not cfg["budget"]["check_free_disk"]:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    need = need_bytes(cfg, step) - existing_bytes(directory)
    free = disk_usage(directory).free
    if need > free:
        raise DiskBudgetError(
            f"{step}: not enough free disk in {directory.resolve()}: it needs {need / GB:,.1f} GB more "
            f"(budget {need_bytes(cfg, step) / GB:,.1f} GB incl. margin x{cfg['budget']['margin']}, "
            f"{existing_bytes(directory) / GB:,.1f} GB already there) but {free / GB:,.1f} GB are free. Free space, "
            f"point work_dir/data_dir elsewhere, or lower train.keep_checkpoints / raise train.save_hf_interval "
            f"(budget.check_free_disk: false skips this check)"
        )
