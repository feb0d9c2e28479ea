"""Toy stage: the generated world, the tiny policy and its warm start (the toy's stand-ins for the
downloads of QA data, corpus and base model; every later stage is the full run's)."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from searchr1 import provenance
from searchr1.fsutil import copy_file_atomic, write_json_atomic
from searchr1.steps import set_threads
from searchr1.steps.retrieval import place, retriever
from searchr1.steps.settings import StepSettings

log = logging.getLogger("searchr1.steps.toy")


def toy_world(cfg: StepSettings, *, outputs, **_: Any) -> None:
    """Generate the toy world, then place its files where the full run's downloads would put theirs."""
    import pandas as pd

    from searchr1.data import _write_parquet_atomic
    from searchr1.toy.world import WorldSizes, write_world

    world_dir = Path(outputs["world"]).parent
    record = cfg.record()
    write_world(cfg["seed"], world_dir, WorldSizes.from_config(cfg))
    world = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    world["provenance"] = record
    write_json_atomic(world_dir / "world.json", world)
    for src, key in (("train.parquet", "train"), ("test.parquet", "test")):
        _write_parquet_atomic(pd.read_parquet(world_dir / src), Path(outputs[key]), record)
    copy_file_atomic(world_dir / "corpus.jsonl", Path(outputs["corpus"]))


def toy_policy_init(cfg: StepSettings, *, inputs, outputs, **_: Any) -> None:
    from searchr1.toy.model import ToyModelSize, write_model
    from searchr1.toy.tokenizer import write_tokenizer

    write_tokenizer(Path(inputs["world"]).parent, outputs["tokenizer"])
    write_model(outputs["tokenizer"], outputs["model"], ToyModelSize.from_config(cfg), seed=cfg["seed"])
    provenance.write_model_record(outputs["model"], cfg.record(inputs={"world": provenance.of_json(inputs["world"])}))


def toy_warm_start(cfg: StepSettings, *, inputs, outputs, threads: int = 1, log_path=None, **_: Any) -> None:
    """Supervised warm start on format demos, retrieving through the real server (the base policy)."""
    from searchr1.toy.warmstart import WarmStartConfig, http_retriever, stderr_progress, warm_start
    from searchr1.toy.world import load_world

    set_threads(threads)
    out = Path(outputs["_list"][0])
    with ExitStack() as server:
        url = server.enter_context(retriever(cfg, inputs, log_path, gpus=place(cfg, "toy_warm_start").retriever))
        search = http_retriever(
            url, timeout_s=cfg["retriever"]["timeout_s"], max_retries=cfg["retriever"]["max_retries"]
        )

        def retrieve_then_stop_server(queries: list[str], topk: int) -> list[list[dict]]:
            # make_demos retrieves every demo's passages in this one call; stopping the server before the
            # training loop gives its memory and threads back for the rest of the step.
            try:
                return search(queries, topk)
            finally:
                server.close()

        result = warm_start(
            inputs["model"],
            load_world(Path(inputs["world"]).parent),
            retrieve_then_stop_server,
            out,
            WarmStartConfig.from_config(cfg),
            stderr_progress,
        )
    record = cfg.record(
        inputs={"init": provenance.of_model_dir(inputs["model"]), "index": provenance.of_path(inputs["index"])}
    )
    provenance.write_model_record(out, record)
    log.info("warm start: final loss %.3f in %.0f s", result.final_loss, result.time_s)
