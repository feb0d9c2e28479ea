"""Train stage: GRPO with slime (Megatron + SGLang, the full run) or the one-process torch backend (toy),
with the job's own retriever; then the final policy as an HF checkpoint."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from searchr1 import provenance
from searchr1.fsutil import copy_file_atomic, move_dir, write_json_atomic, write_text_atomic
from searchr1.steps import set_threads
from searchr1.steps.retrieval import place, retrieval_client, retriever, retriever_inputs_record
from searchr1.steps.settings import StepSettings

log = logging.getLogger("searchr1.steps.train")


def train_work(cfg: StepSettings) -> Path:
    """Checkpoints, HF exports and in-progress metrics: ``<work_dir>/train``, never a declared output (a failed
    job keeps them, and a rerun resumes from them)."""
    return Path(cfg["work_dir"]) / "train"


def slime_paths(
    cfg: StepSettings, *, base_model: str, train_parquet: str, retriever_url: str, image_file: str | None = None
) -> dict[str, Any]:
    work = train_work(cfg)
    return {
        "hf_checkpoint": base_model,
        "train_parquet": train_parquet,
        "save_dir": work / "slime_ckpt",
        "save_hf_dir": work / "hf",
        "metrics_path": work / "metrics.jsonl",
        "eval_metrics_path": work / "eval_curve.jsonl",
        "custom_config_path": work / "search_config.yaml",
        "retriever_url": retriever_url,
        "log_dir": "logs",
        "plugin_pythonpath": Path(__file__).resolve().parents[2],
        "work_dir": cfg["work_dir"],
        "image_file": image_file,
    }


def retriever_host(cfg: StepSettings, head_ip: str) -> str:
    """The address the train job's own retriever binds (and slime is given): ``retriever.host``, except with
    ``train.slime.nodes > 1``, where a loopback or wildcard host becomes the head node's address in the
    allocation (``head_ip``, the one Ray's head uses).

    slime calls the retriever from its RolloutManager Ray actor, which Ray may place on any node: 127.0.0.1
    would be another machine there, and 0.0.0.0 is no address to call. Binding the head's routable address
    makes the retriever reachable from every node of the allocation (and from whatever else reaches that
    network: docs/cluster.md).
    """
    from searchr1.slime_launch import is_loopback

    host = cfg["retriever"]["host"]
    if cfg["train"]["backend"] != "slime" or int(cfg["train"]["slime"]["nodes"]) <= 1:
        return host
    return head_ip if is_loopback(host) or host in ("0.0.0.0", "::", "") else host


def _planned_retriever_url(cfg: StepSettings, head_ip: str) -> str:
    ret = cfg["retriever"]
    if ret["url"]:
        return ret["url"]
    port = ret["port"] or "<free port>"
    return f"http://{retriever_host(cfg, head_ip)}:{port}/retrieve"


def slime_cluster(cfg: StepSettings, env: Mapping[str, str] | None = None, **resolve: Any):
    """The allocation's head and workers (``searchr1.slime_launch.cluster_from_env``, ``resolve``: its
    ``expand_hostnames`` / ``resolve_ip``) for the train job."""
    from searchr1.slime_launch import cluster_from_env

    return cluster_from_env(int(cfg["train"]["slime"]["nodes"]), os.environ if env is None else env, **resolve)


def slime_preview(cfg: StepSettings, *, base_model: str, train_parquet: str, image_file: str | None = None) -> str:
    """The commands the slime train job will run, for `snakemake -n` (same builder as the job itself)."""
    from searchr1.slime_launch import build_plan

    nodes = int(cfg["train"]["slime"]["nodes"])
    # The allocation's nodes are known only inside the SLURM job: the preview names them <node1>, <node2>, ...
    placeholders = [f"<node{i + 1}>" for i in range(nodes)]
    paths = slime_paths(
        cfg,
        base_model=base_model,
        train_parquet=train_parquet,
        retriever_url=_planned_retriever_url(cfg, f"<ip of {placeholders[0]}>"),
        image_file=image_file,
    )
    from searchr1.retrieval.placement import assign_gpus

    plan = build_plan(
        cfg,
        paths=paths,
        env={"SLURM_JOB_NODELIST": ",".join(placeholders), "SLURM_JOB_ID": "<job>"} if nodes > 1 else {},
        expand_hostnames=lambda _: placeholders,
        resolve_ip=lambda host: f"<ip of {host}>",
        pick_port=lambda: "<free port>",
        # The job's GPU ids are known only inside it (SLURM's CUDA_VISIBLE_DEVICES): the preview shows 0..N-1.
        head_gpus=assign_gpus(cfg, "train", {}).compute,
    )
    return plan.to_shell()


RESUME_KEY = "resume_key.json"


def _inputs_record(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "base": provenance.of_model_dir(inputs["base"]),
        "train": provenance.of_parquet(inputs["train"]),
        "index": retriever_inputs_record(inputs),
    }


def resume_key(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the work dir's checkpoints are made from, out of the step's provenance ``record``: its settings (not
    the operational ones) and its inputs' records. A checkpoint is resumed only under the same key."""
    return json.loads(json.dumps({"settings": record["settings"], "inputs": record["inputs"]}, sort_keys=True))


def claim_work_dir(work: Path, key: Mapping[str, Any]) -> None:
    """Keep ``work`` for resuming only if it was made under ``key``; otherwise move it to ``<work>.superseded``.

    Snakemake reruns the train job when a setting or an input changes, but the work dir is not an output (a
    killed job must resume from it): without this check the rerun would resume checkpoints made from the old
    base model or settings and report them as the new run. The moved dir replaces an older superseded one
    (one generation kept: a full-scale checkpoint set is tens of GB).
    """
    key_path = work / RESUME_KEY
    held = work.is_dir() and any(p.name != RESUME_KEY for p in work.iterdir())
    try:
        previous = json.loads(key_path.read_text(encoding="utf-8")) if key_path.is_file() else None
    except (OSError, ValueError):  # unreadable: cannot vouch for the work either
        previous = None
    if not isinstance(previous, dict) or not all(isinstance(previous.get(p), dict) for p in ("settings", "inputs")):
        previous = None
    if held and previous != dict(key):
        if previous is None:
            why = f"{key_path.name} is missing or unreadable (made by an older version, or by hand)"
        else:
            changed = [
                f"{kind} {k}"
                for kind, part in (("setting", "settings"), ("input", "inputs"))
                for k in sorted(previous[part].keys() | key[part].keys())
                if previous[part].get(k) != key[part].get(k)
            ]
            why = "changed since it was made: " + ", ".join(changed)
        superseded = move_dir(work, work.with_name(work.name + ".superseded"))
        log.warning("not resuming from %s (%s); moved it to %s and training from the start", work, why, superseded)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(key_path, dict(key))


def train(cfg: StepSettings, *, inputs, outputs, threads: int = 1, log_path=None, **_: Any) -> None:
    from searchr1.budget import require_free_disk

    set_threads(threads)
    work = train_work(cfg)
    record = cfg.record(inputs=_inputs_record(inputs))
    claim_work_dir(work, resume_key(record))
    require_free_disk(cfg, "train", work)  # before anything starts: checkpoints at the configured retention
    check_reward_prompt(cfg, inputs)
    backend = cfg["train"]["backend"]
    curve = bool(cfg["eval"]["interval"])
    # slime on several nodes: the retriever binds the head's address in the allocation (retriever_host)
    cluster = slime_cluster(cfg) if backend == "slime" else None
    host = retriever_host(cfg, cluster.head_ip) if cluster else None
    gpus = place(cfg, "train")  # before the retriever and slime: a shared retriever that cannot fit is refused here
    with retriever(cfg, inputs, log_path, host=host, gpus=gpus.retriever) as url:
        if backend == "torch":
            from searchr1.grpo.settings import GRPOSettings
            from searchr1.grpo.trainer import train_grpo

            summary = train_grpo(
                policy_dir=inputs["base"],
                train_parquet=inputs["train"],
                work_dir=work,
                metrics_path=work / "metrics.jsonl",
                export_dir=work / "export",
                retriever_url=url,
                settings=GRPOSettings.from_config(cfg),
                eval_hook=learning_curve_hook(cfg, inputs, url, work) if curve else None,
            )
            final = {"backend": "torch", "hf_dir": str(summary["export_dir"]), "steps": summary["steps"]}
        else:
            final = train_slime(cfg, inputs, url, log_path, head_gpus=gpus.compute)
    copy_file_atomic(work / "metrics.jsonl", Path(outputs["metrics"]))
    if outputs.get("curve"):  # declared when eval.interval turns the learning curve on
        curve_path = work / "eval_curve.jsonl"
        if curve_path.exists():
            copy_file_atomic(curve_path, Path(outputs["curve"]))
        else:  # no point due yet (num_rollout below eval.interval): an empty curve
            write_text_atomic(Path(outputs["curve"]), "")
    final["provenance"] = record
    write_json_atomic(outputs["final"], final)


def train_slime(
    cfg: StepSettings, inputs: Mapping[str, Any], url: str, log_path: Path | None, **launch: Any
) -> dict[str, Any]:
    """Run slime (``searchr1.slime_launch``) against the retriever at ``url``; the final HF export, checked.

    ``launch`` goes to ``build_plan`` (the two-node test: ``node_prefix``, ``expand_hostnames``, ``resolve_ip``).
    """
    from searchr1.retention import RetentionWatcher
    from searchr1.slime_launch import build_plan, final_hf_checkpoint, run_plan, write_custom_config

    paths = slime_paths(
        cfg,
        base_model=inputs["base"],
        train_parquet=inputs["train"],
        retriever_url=url,
        image_file=inputs.get("image"),
    )
    if cfg["eval"]["interval"]:  # the learning curve inside training
        paths["eval_prompt_data"] = dict(zip(cfg["eval"]["splits"], inputs["splits"]))
    write_custom_config(paths["custom_config_path"], cfg, url, paths["metrics_path"], paths["eval_metrics_path"])
    plan = build_plan(cfg, paths=paths, env=os.environ, **launch)
    # Retention: prune before slime starts (a kill between a save and its prune leaves one too many)
    # and after every save while it trains (searchr1.retention).
    with RetentionWatcher(
        paths["save_dir"],
        paths["save_hf_dir"],
        keep=cfg["train"]["keep_checkpoints"],
        hf_interval=cfg["train"]["save_hf_interval"],
    ):
        rc = run_plan(plan, log_path.with_suffix(".slime.log") if log_path else "logs/train.slime.log")
    if rc != 0:
        raise RuntimeError(f"slime training exited with status {rc}; see the slime log beside {log_path}")
    return {
        "backend": "slime",
        "hf_dir": str(final_hf_checkpoint(paths["save_hf_dir"])),
        "steps": cfg["train"]["num_rollout"],
    }


def check_reward_prompt(cfg: StepSettings, inputs: Mapping[str, Any]) -> None:
    """A format-aware reward (a non-zero ``reward.*`` score) needs Search-R1's assistant marker in the prompt:
    checked on the first training prompt through the base model's chat template, before the retriever or slime
    starts (both backends check again where the prompts are used: the torch trainer on every prompt, the slime
    plugin on every sample). Raises searchr1.reward.RewardConfigError."""
    from searchr1.reward import RewardSettings

    reward = RewardSettings.from_config(cfg)
    if reward.is_exact_match:
        return
    from transformers import AutoTokenizer

    from searchr1.grpo.data import first_prompt_text

    tokenizer = AutoTokenizer.from_pretrained(str(inputs["base"]))
    reward.check_prompt(first_prompt_text(inputs["train"], tokenizer))


def learning_curve_hook(cfg: StepSettings, inputs: Mapping[str, Any], url: str, work: Path):
    """Greedy EM on a fixed held-out subset (the first ``eval.curve_subset`` rows of each split)."""
    import asyncio

    from searchr1.engines import HFEngine
    from searchr1.evaluate import append_curve_point, eval_agent_config, evaluate_rows, load_split, summarize_rows

    subset = cfg["eval"]["curve_subset"]
    rows = {split: load_split(path, subset) for split, path in zip(cfg["eval"]["splits"], inputs["splits"])}
    agent_cfg = eval_agent_config(cfg)
    curve_path = work / "eval_curve.jsonl"
    batch_size = cfg["eval"]["batch_size"]

    def hook(step: int, model: Any, tokenizer: Any, *, before_training: bool = False) -> None:
        async def run(split_rows):
            client = retrieval_client(cfg, url)
            try:
                engine = HFEngine(model, tokenizer, device=str(next(model.parameters()).device))
                return await evaluate_rows(engine, client, tokenizer, split_rows, agent_cfg, batch_size)
            finally:
                await client.aclose()

        was_training = model.training
        model.eval()
        try:
            for split, split_rows in rows.items():
                summary = summarize_rows(asyncio.run(run(split_rows)))
                # a resumed run evaluates a step again: its point is replaced, not duplicated
                append_curve_point(curve_path, step=step, split=split, summary=summary, before_training=before_training)
                when = "before training" if before_training else f"step {step}"
                log.info("learning curve: %s %s EM %.3f", when, split, summary["em"])
        finally:
            model.train(was_training)

    return hook


def export_rl(cfg: StepSettings, *, inputs, outputs, **_: Any) -> None:
    """The final policy as an HF checkpoint, with the training's provenance inside it."""
    from searchr1.slime_launch import export_hf

    final = json.loads(Path(inputs["final"]).read_text())
    out = Path(outputs["_list"][0])
    export_hf(final["hf_dir"], out)
    provenance.write_model_record(out, cfg.record(inputs={"final": final.get("provenance")}))


def container_image(cfg: StepSettings, *, outputs, **_: Any) -> None:
    """Pull (apptainer: and convert) the slime image once, to a file under <work_dir>/images, resumably; the
    train job and the SGLang evaluation run from it, so none of them pays the conversion inside a timeout."""
    from searchr1.budget import require_free_disk
    from searchr1.container import fetch_image

    out = Path(outputs["_list"][0])
    require_free_disk(cfg, "container_image", out.parent)
    fetch_image(cfg["train"]["slime"], out, log=log.info)
    log.info("image ready: %s", out)
