"""Evaluate stage: one model on one split, greedy, with the training agent loop and reward."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from searchr1 import provenance
from searchr1.steps import set_threads
from searchr1.steps.retrieval import place, retriever, retriever_inputs_record
from searchr1.steps.settings import StepSettings

log = logging.getLogger("searchr1.steps.evaluate")


def evaluate(cfg: StepSettings, *, inputs, outputs, wildcards, threads: int = 1, log_path=None, **_: Any) -> None:
    from searchr1.evaluate import eval_agent_config, evaluate_split

    set_threads(threads)
    ev = cfg["eval"]
    engine = ev["engine"]
    sglang = engine == "sglang"
    record = cfg.record(
        inputs={
            "model": provenance.of_model_dir(inputs["model"]),
            "split": provenance.of_parquet(inputs["split"]),
            "index": retriever_inputs_record(inputs),
        }
    )
    gpus = place(cfg, "evaluate")  # before SGLang starts: a shared retriever that cannot fit is refused here
    # The retriever starts on the first search and stops when the job ends: a model that never searches
    # (the toy's base and initial policies) is evaluated without waiting for one.
    with contextlib.ExitStack() as servers:
        summary = evaluate_split(
            model_dir=inputs["model"],
            split_parquet=inputs["split"],
            out_jsonl=outputs["jsonl"],
            out_json=outputs["summary"],
            retriever_url=lambda: servers.enter_context(retriever(cfg, inputs, log_path, gpus=gpus.retriever)),
            agent_cfg=eval_agent_config(cfg),
            engine=engine,
            batch_size=ev["batch_size"],
            max_questions=ev["max_questions"],
            model_label=wildcards["model"],
            split_label=wildcards["split"],
            retriever_timeout_s=cfg["retriever"]["timeout_s"],
            retriever_max_retries=cfg["retriever"]["max_retries"],
            retriever_concurrency=cfg["agent"]["search_concurrency"],
            seed=cfg["seed"],
            sglang_tp=max(1, ev["resources"]["gpus"]) if sglang else 1,
            sglang_mem_fraction=cfg["train"]["slime"]["sglang_mem_fraction_static"] if sglang else None,
            sglang_log_path=log_path.with_suffix(".sglang.log") if log_path else None,
            sglang_input_mode=cfg["agent"]["sglang_input"] if sglang else "text",
            sglang_skip_special_tokens=cfg["agent"]["skip_special_tokens"] if sglang else False,
            sglang_wrap=sglang_in_container(cfg, inputs["model"], inputs.get("image"), gpus.compute)
            if sglang
            else None,
            partial_dir=Path(cfg["work_dir"]) / "eval" / wildcards["model"],
            info={"provenance": record},
            inputs_record=record["inputs"],
        )
    log.info("EM %s = %.4f (n=%d)", wildcards, summary["em"], summary["n"])


def sglang_in_container(
    cfg: StepSettings, model_dir: str, image_file: str | None = None, gpus: Sequence[str] | None = None
):
    """Run the eval's SGLang server where SGLang is installed: the slime image (train.slime.container_runtime),
    from the file the container_image step pulled, with the model's absolute directory bound (the server's
    --model-path is absolute too: searchr1.evaluate.sglang_server). ``gpus``: the GPU ids the server may see
    (apptainer, none: ``env CUDA_VISIBLE_DEVICES=...`` before it; docker: the container gets only those), so a
    dedicated retriever's GPUs are not its."""
    from searchr1.slime_launch import wrap_in_container

    slime = cfg["train"]["slime"]
    binds = [str(Path(model_dir).resolve())]
    image = str(Path(image_file).resolve()) if image_file else None

    def wrap(command: list[str]) -> list[str]:
        if slime["container_runtime"] != "none":
            command = ["python3", *command[1:]]  # the image's interpreter, not this job's
        process_env = None
        if gpus is not None:
            if slime["container_runtime"] == "docker":  # the container is given these GPUs only
                process_env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
            else:  # host ids, kept by apptainer --nv
                command = ["env", f"CUDA_VISIBLE_DEVICES={','.join(gpus)}", *command]
        return wrap_in_container(command, slime, binds, image_file=image, env=slime["env"], process_env=process_env)

    return wrap
