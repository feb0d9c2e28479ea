"""Retrieval stage: corpus, encoder and index artifacts, the retriever a job starts, and the retriever check."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from searchr1 import provenance
from searchr1.fsutil import copy_tree_atomic, write_json_atomic
from searchr1.steps import set_threads
from searchr1.steps.data import lock_path
from searchr1.steps.settings import StepSettings

log = logging.getLogger("searchr1.steps.retrieval")

# A passage's own text must find it: anything far below 1.0 means a mismatched or broken index/corpus pair.
MIN_SELF_RECALL = 0.5
CHECK_PROBES = 32


def make_encoder(cfg: StepSettings, encoder_dir: str | Path):
    """The retriever's encoder from ``retriever.encoder`` (the same settings the index was built with)."""
    from searchr1.retrieval.encoder import Encoder

    enc = cfg["retriever"]["encoder"]
    return Encoder(
        encoder_dir,
        query_prefix=enc["query_prefix"],
        passage_prefix=enc["passage_prefix"],
        pooling=enc["pooling"],
        normalize=enc["normalize"],
        max_length=enc["max_length"],
        fp16=None if enc["fp16"] else False,  # None: fp16 on CUDA only
        cpu_bf16=enc["cpu_bf16"],
    )


def encoder_server_args(cfg: StepSettings) -> list[str]:
    """The same encoder settings as flags of ``python -m searchr1.retrieval serve`` (a separate process)."""
    enc = cfg["retriever"]["encoder"]
    args = [
        "--query-prefix",
        enc["query_prefix"],
        "--passage-prefix",
        enc["passage_prefix"],
        "--pooling",
        enc["pooling"],
        "--max-length",
        str(enc["max_length"]),
        "--fp16",
        "auto" if enc["fp16"] else "off",
    ]
    if not enc["normalize"]:
        args.append("--no-normalize")
    if enc["cpu_bf16"]:
        args.append("--cpu-bf16")
    return args


def encoder_record(cfg: StepSettings) -> dict[str, Any]:
    enc = cfg["retriever"]["encoder"]
    return {"name": enc["repo"], "query_prefix": enc["query_prefix"], "passage_prefix": enc["passage_prefix"]}


def add_index_record(index_path: str | Path, record: Mapping[str, Any]) -> None:
    """Put the step's provenance into the index's metadata file (beside the pair fingerprint)."""
    from searchr1.retrieval.index import meta_path_for

    meta_path = meta_path_for(index_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["provenance"] = dict(record)
    write_json_atomic(meta_path, meta)


# --- artifacts --------------------------------------------------------------------------------------------


def download_corpus(cfg: StepSettings, *, outputs, **_: Any) -> None:
    from searchr1.retrieval.download import download_corpus as fetch

    corpus = cfg["retriever"]["corpus"]
    out = Path(outputs["_list"][0])
    fetch(
        corpus["repo"],
        corpus["file"],
        revision=corpus["revision"],
        dest_dir=out.parent / "download",
        out=out,
        lock_path=lock_path(cfg),
    )


def corpus_offsets(cfg: StepSettings, *, inputs, outputs, **_: Any) -> None:
    from searchr1.retrieval.corpus import build_offsets

    made = build_offsets(inputs["_list"][0])
    expected = Path(outputs["_list"][0])
    if Path(made).resolve() != expected.resolve():
        raise RuntimeError(f"offsets written to {made}, but the workflow expects {expected}")


def encoder_source_dir(repo: str) -> Path | None:
    """The local folder of a packaged encoder ('package:<python package>'), else None (a hub repo)."""
    if not repo.startswith("package:"):
        return None
    import importlib

    module = importlib.import_module(repo.split(":", 1)[1])
    folder = Path(module.__file__).parent / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"encoder package {repo!r} has no model folder at {folder}")
    return folder


def fetch_encoder(cfg: StepSettings, *, outputs, **_: Any) -> None:
    from searchr1.data import download_snapshot

    enc = cfg["retriever"]["encoder"]
    out = Path(outputs["_list"][0])
    packaged = encoder_source_dir(enc["repo"])
    if packaged is not None:
        copy_tree_atomic(packaged, out)
    else:
        download_snapshot(enc["repo"], dest_dir=out, revision=enc["revision"])


def download_index(cfg: StepSettings, *, inputs, outputs, **_: Any) -> None:
    from searchr1.budget import require_free_disk
    from searchr1.retrieval.download import download_index as fetch

    idx = cfg["retriever"]["index"]
    out = Path(outputs["index"])
    require_free_disk(cfg, "download_index", out.parent)  # the parts and the concatenated index, at the peak
    fetch(
        idx["repo"],
        idx["parts"],
        revision=idx["revision"],
        dest_dir=out.parent / "download",
        out=out,
        corpus=Path(inputs["corpus"]),
        encoder=encoder_record(cfg),
        lock_path=lock_path(cfg),
    )
    add_index_record(out, cfg.record())


def build_index(cfg: StepSettings, *, inputs, outputs, threads: int = 1, **_: Any) -> None:
    from searchr1.budget import require_free_disk
    from searchr1.retrieval.index import build_index as build

    set_threads(threads)
    idx = cfg["retriever"]["index"]
    require_free_disk(cfg, "build_index", Path(outputs["index"]).parent)
    build(
        inputs["corpus"],
        make_encoder(cfg, inputs["encoder"]),
        outputs["index"],
        batch_size=idx["build_batch_size"],
        shard_size=idx["build_shard_size"],
    )
    add_index_record(outputs["index"], cfg.record())


# --- the retriever a job starts ---------------------------------------------------------------------------


def place(cfg: StepSettings, job: str, env: Mapping[str, str] | None = None):
    """The job's GPUs split between its own work and its retriever (``retriever.placement``), after the shared
    layout's memory check against the real GPUs where SGLang runs beside it (train with slime, SGLang
    evaluation): a refusal comes before slime or SGLang starts."""
    import os

    from searchr1.retrieval.placement import assign_gpus, check_shared_fit, gpu_total_bytes, placement

    assignment = assign_gpus(cfg, job, os.environ if env is None else env)
    beside_sglang = (job == "train" and cfg["train"]["backend"] == "slime") or (
        job == "evaluate" and cfg["eval"]["engine"] == "sglang"
    )
    if placement(cfg) == "shared" and beside_sglang:
        figures = check_shared_fit(cfg, job, gpu_total_bytes(assignment.retriever), source="nvidia-smi")
        log.info("shared retriever fits: %s", figures)
    log.info(
        "%s: GPUs of its own work %s, of its retriever %s", job, assignment.compute, assignment.retriever or "none"
    )
    return assignment


@contextlib.contextmanager
def retriever(
    cfg: StepSettings,
    inputs: Mapping[str, str],
    log_path: Path | None,
    *,
    gpus: Sequence[str],
    host: str | None = None,
) -> Iterator[str]:
    """The /retrieve URL for a job: ``retriever.url`` if set, else a server this job starts and stops, bound
    to ``host`` (default ``retriever.host``; the multi-node train job passes the head's address) and seeing
    only the GPU ids ``gpus`` ([] = none: encoder and index on the CPU; see ``place``)."""
    from searchr1.retrieval.managed import managed_server
    from searchr1.retrieval.placement import retriever_process

    ret = cfg["retriever"]
    server_log = log_path.with_suffix(".retriever.log") if log_path else Path("logs/retriever.log")
    place_args, place_env = retriever_process(cfg, gpus) if not ret["url"] else ([], {})
    extra = [
        *encoder_server_args(cfg),
        "--backend",
        ret["backend"],
        "--topk",
        str(ret["topk"]),
        "--topk-max",
        str(ret["topk_max"]),
        "--max-batch-size",
        str(ret["max_batch_size"]),
        "--max-wait-ms",
        str(ret["max_wait_ms"]),
        *place_args,  # after --backend: shared names the torch backend explicitly
    ]
    with managed_server(
        corpus=inputs.get("corpus"),
        index=inputs.get("index"),
        encoder=inputs.get("encoder"),
        host=host or ret["host"],
        port=ret["port"],
        log_path=server_log,
        startup_timeout_s=ret["startup_timeout_s"],
        url=ret["url"],
        extra_args=extra,
        env=place_env,
    ) as url:
        yield url


def retrieval_client(cfg: StepSettings, url: str):
    from searchr1.retrieval.client import RetrievalClient

    ret = cfg["retriever"]
    return RetrievalClient(
        url,
        timeout_s=ret["timeout_s"],
        max_retries=ret["max_retries"],
        concurrency=cfg["agent"]["search_concurrency"],
    )


def retriever_inputs_record(inputs: Mapping[str, str]) -> dict[str, Any] | None:
    return provenance.of_path(inputs["index"]) if inputs.get("index") else None


def retriever_check(cfg: StepSettings, *, inputs, outputs, log_path=None, **_: Any) -> None:
    """Serve the index/corpus pair and check that passages are found by their own text (self-retrieval)."""
    import asyncio

    from searchr1.retrieval.corpus import CorpusStore
    from searchr1.retrieval.index import check_pair
    from searchr1.retrieval.managed import check_health

    pair = check_pair(inputs["index"], inputs["corpus"])
    store = CorpusStore(inputs["corpus"])
    rng = random.Random(cfg["seed"])
    rows = sorted(rng.sample(range(len(store)), min(CHECK_PROBES, len(store))))
    probes = [store.get(i) for i in rows]
    queries = [p["contents"].split("\n", 1)[-1][:200] for p in probes]
    topk = cfg["retriever"]["topk"]
    with retriever(cfg, inputs, log_path, gpus=place(cfg, "retriever_check").retriever) as url:
        health = check_health(url)
        client = retrieval_client(cfg, url)

        async def run() -> list[list[dict]]:
            try:
                return await client.search(queries, topk)
            finally:
                await client.aclose()

        start = time.perf_counter()
        hits = asyncio.run(run())
        seconds = time.perf_counter() - start
    found = sum(any(h["id"] == p["id"] for h in hs) for p, hs in zip(probes, hits))
    recall = found / len(probes)
    report = {
        "health": health,
        "pair": pair,
        "probes": len(probes),
        "self_recall_at_k": recall,
        "topk": topk,
        "seconds": seconds,
    }
    log.info("retriever check: %s", report)
    if recall < MIN_SELF_RECALL:
        raise RuntimeError(
            f"retriever self-recall@{topk} is {recall:.2f} on {len(probes)} passages of {inputs['corpus']} with "
            f"{inputs['index']}: the index does not match the corpus or the encoder settings"
        )
    report["provenance"] = cfg.record(inputs={"index": retriever_inputs_record(inputs)})
    write_json_atomic(outputs["_list"][0], report)
