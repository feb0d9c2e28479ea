"""Greedy evaluation of one checkpoint on one test split: per-question JSONL, summary JSON, resumable.

The evaluation reuses the training path exactly: the parquet row's ``prompt`` messages through the
model's chat template, ``searchr1.agent.run_agent`` with the training agent settings, and the seed's
reward ``searchr1.reward.em_score`` on prompt + response (exact match, whatever ``reward.*`` trains on, as
Search-R1 validates). Only the sampling differs (greedy, 1 sample).

Resumability. Progress goes to ``<split>.partial.jsonl`` beside ``out_jsonl`` (a file Snakemake does
not own, so it survives a failed job), one fsync'd append per batch. Batches are fixed slices of the
selected rows in parquet order, so a resumed run sends the engine exactly the batches an uninterrupted
run would, and its files are identical (apart from timestamps). A fingerprint of the model, split and
agent settings sits next to the partial file; progress made under a different fingerprint is
discarded, never mixed in. At the end ``out_jsonl`` and then ``out_json`` are written atomically from
the partial file, which is then removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm import tqdm

from searchr1.fsutil import write_json_atomic, write_text_atomic
from searchr1.process import free_port, http_ok, managed_process
from searchr1.reward import em_score, extract_answer
from searchr1.stats import summarize_rows

if TYPE_CHECKING:
    from searchr1.agent import AgentConfig, Trajectory

logger = logging.getLogger(__name__)

JSONL_KEYS = (
    "id",
    "index",
    "data_source",
    "question",
    "golden_answers",
    "prompt",
    "response",
    "trajectory",
    "extracted_answer",
    "em",
    "searches",
    "queries",
    "response_tokens",
    "total_response_tokens",
    "format_valid",
    "answered",
    "grounded",
    "golden_in_retrieved",
    "status",
    "retrieval_failures",
    "num_turns",
    "response_answer",
)


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One question of a split, as the evaluation needs it."""

    id: str
    index: int
    data_source: str
    question: str
    golden_answers: list[str]
    messages: list[dict[str, str]]


# --------------------------------------------------------------------------------------------------
# data


def _plain(value: Any) -> Any:
    # parquet nests numpy arrays and dicts; make them JSON-able Python objects
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_split(split_parquet: str | Path, max_questions: int | None = None) -> list[EvalRow]:
    """The rows of a Search-R1 parquet in file order (the first ``max_questions`` when given)."""
    path = Path(split_parquet)
    if not path.is_file():
        raise FileNotFoundError(f"missing split parquet: {path}")
    frame = pd.read_parquet(path)
    for column in ("data_source", "prompt", "reward_model"):
        if column not in frame.columns:
            raise ValueError(f"{path}: column {column!r} missing (have {list(frame.columns)})")
    if max_questions is not None:
        if max_questions < 1:
            raise ValueError(f"max_questions must be >= 1 or None, got {max_questions}")
        frame = frame.iloc[:max_questions]
    rows = []
    for position, record in enumerate(frame.to_dict(orient="records")):
        record = _plain(record)
        extra = record.get("extra_info") or {}
        index = int(extra.get("index", position))
        data_source = str(record["data_source"])
        messages = record["prompt"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path} row {position}: 'prompt' must be a non-empty list of messages")
        try:
            golden = record["reward_model"]["ground_truth"]["target"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} row {position}: no reward_model.ground_truth.target") from exc
        golden = [golden] if isinstance(golden, str) else [str(g) for g in golden]
        question = record.get("question")
        if question is None:
            content = messages[-1]["content"]
            question = content.rsplit("Question: ", 1)[-1].strip()
        row_id = record.get("id")
        if row_id is None:
            row_id = f"{data_source}_{index}"
        rows.append(
            EvalRow(
                id=str(row_id),
                index=index,
                data_source=data_source,
                question=str(question),
                golden_answers=golden,
                messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            )
        )
    duplicates = sorted(i for i, c in Counter(r.id for r in rows).items() if c > 1)
    if duplicates:
        raise ValueError(f"{path}: duplicate question ids {duplicates[:5]}")
    return rows


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text the policy sees (the same call as in training)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eval_row(row: EvalRow, traj: Trajectory) -> dict[str, Any]:
    """The per-question JSONL record of one trajectory."""
    from searchr1.agent import golden_in_retrieved

    full_text = traj.full_text
    record = {
        "id": row.id,
        "index": row.index,
        "data_source": row.data_source,
        "question": row.question,
        "golden_answers": list(row.golden_answers),
        "prompt": traj.prompt_text,
        "response": traj.response_text,
        "trajectory": full_text,
        # the seed's verdict: extracted from prompt + response (see searchr1.reward)
        "extracted_answer": extract_answer(full_text),
        "em": em_score(full_text, row.golden_answers),
        "searches": traj.num_searches,
        "queries": list(traj.queries),
        "response_tokens": traj.n_model_tokens,
        "total_response_tokens": len(traj.response_ids),
        "format_valid": bool(traj.format_valid),
        "answered": bool(traj.answered),
        "grounded": bool(traj.answer_in_retrieved),
        "golden_in_retrieved": bool(golden_in_retrieved(traj, row.golden_answers)),
        "status": traj.status,
        "retrieval_failures": traj.retrieval_failures,
        "num_turns": traj.num_turns,
        # the answer in the response alone (diagnostic; not what EM uses)
        "response_answer": traj.extracted_answer,
    }
    assert tuple(record) == JSONL_KEYS
    return record


# --------------------------------------------------------------------------------------------------
# resumable files


def partial_path(out_jsonl: str | Path, partial_dir: str | Path | None = None) -> Path:
    """Where progress accumulates: ``results/eval/base/nq_test.jsonl`` -> ``.../nq_test.partial.jsonl``, or
    ``<partial_dir>/nq_test.partial.jsonl`` (the workflow: ``<work_dir>/eval/<model>/``)."""
    out_jsonl = Path(out_jsonl)
    return Path(partial_dir or out_jsonl.parent) / f"{out_jsonl.stem}.partial.jsonl"


def _fingerprint_path(out_jsonl: str | Path, partial_dir: str | Path | None = None) -> Path:
    out_jsonl = Path(out_jsonl)
    return Path(partial_dir or out_jsonl.parent) / f"{out_jsonl.stem}.partial.meta.json"


def model_fingerprint(model_dir: str | Path) -> str:
    """A cheap identity of a checkpoint directory: names, sizes and mtimes of its files."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"missing model directory: {model_dir}")
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(model_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_done(path: Path) -> list[dict[str, Any]]:
    """Rows already written to a partial file. A torn last line (a crash mid-write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        if newline == -1:
            break  # no newline: the write was cut; redo that row
        line = data[pos:newline]
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if data[newline + 1 :].strip():
                    raise ValueError(f"{path}: corrupt line {len(rows) + 1} in the middle of the file") from None
                break  # a torn last line
        pos = newline + 1
    good_end = pos
    if good_end != len(data):
        logger.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - good_end)
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return rows


def _append_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# the evaluation


def eval_agent_config(cfg: Mapping[str, Any]) -> AgentConfig:
    """The agent settings of an eval from the workflow config: training's, but at the eval temperature."""
    # imported here (as in the other eval functions) so that summarize/the report need no agent stack
    from searchr1.agent import AgentConfig
    from searchr1.config import settings_from_config

    # top_p 1 and top_k -1: no truncation of the distribution (slime's eval defaults); at temperature 0 greedy.
    return settings_from_config(AgentConfig, cfg, top_p=1.0, top_k=-1)


async def evaluate_batch(
    engine: Any, retriever: Any, tokenizer: Any, batch: Sequence[EvalRow], agent_cfg: AgentConfig
) -> list[dict[str, Any]]:
    """Per-question records of one batch (one ``run_agent`` call, turn-synchronous over the batch)."""
    # looked up at call time, so the agent is imported only by code that runs it
    from searchr1 import agent

    prompts = [chat_prompt(tokenizer, r.messages) for r in batch]
    trajectories = await agent.run_agent(engine, retriever, tokenizer, prompts, agent_cfg)
    if len(trajectories) != len(batch):
        raise RuntimeError(f"run_agent returned {len(trajectories)} trajectories for {len(batch)} prompts")
    return [eval_row(r, t) for r, t in zip(batch, trajectories, strict=True)]


async def evaluate_rows(
    engine: Any, retriever: Any, tokenizer: Any, rows: Sequence[EvalRow], agent_cfg: AgentConfig, batch_size: int
) -> list[dict[str, Any]]:
    """Records of ``rows`` without files (a learning-curve point: ``summarize_rows`` + ``append_curve_point``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        records += await evaluate_batch(engine, retriever, tokenizer, rows[start : start + batch_size], agent_cfg)
    return records


async def evaluate_with(
    engine: Any,
    retriever: Any,
    tokenizer: Any,
    *,
    rows: Sequence[EvalRow],
    out_jsonl: str | Path,
    out_json: str | Path,
    agent_cfg: AgentConfig,
    batch_size: int,
    fingerprint: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
    progress: bool = True,
    partial_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``rows`` with a ready engine and retriever; resumable; returns the summary written to out_json.

    Progress accumulates in ``partial_dir`` (default: beside ``out_jsonl``; see :func:`partial_path`).

    ``fingerprint`` identifies what is evaluated (model, split, settings): partial progress made under a
    different fingerprint is discarded. ``info`` is copied into the summary (labels, paths).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    started = time.monotonic()
    started_at = _now()
    out_jsonl = Path(out_jsonl)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    work = partial_path(out_jsonl, partial_dir)
    meta_path = _fingerprint_path(out_jsonl, partial_dir)
    work.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True))

    if work.exists():
        previous = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else None
        if previous != fingerprint:
            logger.warning("%s was made for another model/split/settings; starting over", work)
            work.unlink()
    if not work.exists():
        write_json_atomic(meta_path, fingerprint)
        work.touch()

    wanted = {r.id for r in rows}
    done_rows = read_done(work)
    done = {r["id"] for r in done_rows}
    stray = sorted(done - wanted)
    if stray:  # e.g. max_questions was lowered: those results are valid, just not asked for now
        logger.warning("%s: %d done questions are not among those to evaluate; left out", work, len(stray))
    if len(done) != len(done_rows):
        raise ValueError(f"{work}: some question ids appear twice")
    if done:
        logger.info("%s: resuming, %d of %d questions already done", work, len(done), len(rows))

    # Fixed batch boundaries over the selected rows: a resumed run repeats the same batches.
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    todo = [[r for r in batch if r.id not in done] for batch in batches]
    todo = [b for b in todo if b]
    for batch in tqdm(todo, desc=f"eval {out_jsonl.name}", unit="batch", disable=not progress):
        _append_rows(work, await evaluate_batch(engine, retriever, tokenizer, batch, agent_cfg))

    # Rows in parquet order (a resumed file is already in order; this makes it certain).
    by_id = {r["id"]: r for r in read_done(work)}
    missing = [r.id for r in rows if r.id not in by_id]
    if missing:
        raise RuntimeError(f"{work}: questions missing after evaluation: {missing[:5]}")
    ordered = [by_id[r.id] for r in rows]
    summary = summarize_rows(ordered, source=str(work))
    summary.update(dict(info or {}))
    summary.update(
        {
            "temperature": agent_cfg.temperature,
            "n_samples": 1,
            "agent": dataclasses.asdict(agent_cfg),
            "batch_size": batch_size,
            "retriever_stats": dict(getattr(retriever, "stats", {}) or {}),
            "started_at": started_at,
            "finished_at": _now(),
            "wall_time_s": round(time.monotonic() - started, 3),
        }
    )
    write_text_atomic(out_jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    write_json_atomic(out_json, summary)
    work.unlink()
    meta_path.unlink(missing_ok=True)
    return summary


def evaluate_split(
    *,
    model_dir: str | Path,
    split_parquet: str | Path,
    out_jsonl: str | Path,
    out_json: str | Path,
    retriever_url: str | Callable[[], str],
    agent_cfg: AgentConfig,
    engine: str,
    batch_size: int,
    max_questions: int | None,
    model_label: str,
    split_label: str,
    retriever_timeout_s: float,
    retriever_max_retries: int,
    retriever_concurrency: int,
    seed: int,
    device: str = "cpu",
    sglang_url: str | None = None,
    sglang_input_mode: str = "text",
    sglang_skip_special_tokens: bool,  # the config's agent.skip_special_tokens (used with engine "sglang")
    partial_dir: str | Path | None = None,
    sglang_wrap: Callable[[list[str]], list[str]] | None = None,
    sglang_tp: int = 1,
    sglang_mem_fraction: float | None = None,
    sglang_log_path: str | Path | None = None,
    info: Mapping[str, Any] | None = None,
    inputs_record: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy-evaluate the checkpoint ``model_dir`` on one split; writes out_jsonl and out_json.

    engine "hf" runs transformers locally (``device``); "sglang" talks to ``sglang_url`` or, when that is
    None, launches an SGLang server on the checkpoint for the duration of the eval. ``inputs_record`` (the
    provenance records of model, split and index) joins the fingerprint of resumable progress: answers found
    with another index, or for a split file rewritten in place, are not resumed. ``retriever_url`` is the
    retriever's /retrieve URL, or a function that starts one and returns its URL: called on the first
    search only (``StartOnFirstSearch``), so a model that never searches never waits for a retriever.
    """
    from transformers import AutoTokenizer

    from searchr1.engines import HFEngine, SGLangEngine
    from searchr1.retrieval.client import RetrievalClient, StartOnFirstSearch

    if engine not in ("hf", "sglang"):
        raise ValueError(f"engine must be 'hf' or 'sglang', got {engine!r}")
    if agent_cfg.temperature != 0.0:
        logger.warning("evaluating at temperature %s (not greedy)", agent_cfg.temperature)
    rows = load_split(split_parquet, max_questions)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    fingerprint = {
        "model": model_fingerprint(model_dir),
        "split_parquet": str(Path(split_parquet).resolve()),
        "agent": dataclasses.asdict(agent_cfg),
        "batch_size": batch_size,
        "engine": engine,
    }
    if engine == "sglang":
        fingerprint["skip_special_tokens"] = sglang_skip_special_tokens
    if inputs_record is not None:
        fingerprint["inputs"] = dict(inputs_record)
    info = {
        **dict(info or {}),
        "model_label": model_label,
        "split": split_label,
        "engine": engine,
        "model_dir": str(model_dir),
        "split_parquet": str(split_parquet),
        "retriever_url": None if callable(retriever_url) else retriever_url,
        "max_questions": max_questions,
    }

    def client(url: str) -> RetrievalClient:
        return RetrievalClient(
            url, timeout_s=retriever_timeout_s, max_retries=retriever_max_retries, concurrency=retriever_concurrency
        )

    def start_retriever() -> str:
        assert callable(retriever_url)
        url = retriever_url()
        info["retriever_url"] = url  # the summary names the server that answered (None: never started)
        return url

    async def run(gen_engine: Any) -> dict[str, Any]:
        retriever: Any = (
            StartOnFirstSearch(start_retriever, client) if callable(retriever_url) else client(retriever_url)
        )
        try:
            return await evaluate_with(
                gen_engine,
                retriever,
                tokenizer,
                rows=rows,
                out_jsonl=out_jsonl,
                out_json=out_json,
                agent_cfg=agent_cfg,
                batch_size=batch_size,
                fingerprint=fingerprint,
                info=info,
                progress=progress,
                partial_dir=partial_dir,
            )
        finally:
            await retriever.aclose()
            close = getattr(gen_engine, "aclose", None)
            if close is not None:
                await close()

    if engine == "hf":
        return asyncio.run(
            run(HFEngine.from_pretrained(model_dir, device=device, max_batch_size=batch_size, seed=seed))
        )
    if sglang_url is not None:
        engine_ = SGLangEngine(sglang_url, input_mode=sglang_input_mode, skip_special_tokens=sglang_skip_special_tokens)
        return asyncio.run(run(engine_))
    if sglang_mem_fraction is None:
        raise ValueError("engine 'sglang' needs sglang_mem_fraction (train.slime.sglang_mem_fraction_static)")
    log_path = sglang_log_path or Path(str(out_json) + ".sglang.log")
    with sglang_server(
        model_dir, port=0, tp=sglang_tp, mem_fraction=sglang_mem_fraction, log_path=log_path, wrap=sglang_wrap
    ) as url:
        engine_ = SGLangEngine(url, input_mode=sglang_input_mode, skip_special_tokens=sglang_skip_special_tokens)
        return asyncio.run(run(engine_))


# --------------------------------------------------------------------------------------------------
# SGLang server


@contextlib.contextmanager
def sglang_server(
    model_dir: str | Path,
    *,
    port: int = 0,
    tp: int,
    mem_fraction: float,
    log_path: str | Path,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 1800.0,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    stop_grace_s: float = 30.0,
    poll_interval_s: float = 1.0,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Iterator[str]:
    """Run ``python -m sglang.launch_server`` on ``model_dir``; yield its base URL once /health answers.

    Started and stopped by ``searchr1.process.managed_process``: the server and its children are stopped on
    every exit path (SIGTERM of the job included); ``env`` adds variables. ``port`` 0 picks a free port.
    ``wrap`` turns the command into the one that runs it (e.g. inside the slime container, where SGLang is
    installed).
    """
    if port == 0:
        port = free_port(host)
    command = [
        python,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(Path(model_dir).resolve()),  # absolute: a container binds the model's absolute directory
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        str(tp),
        "--mem-fraction-static",
        str(mem_fraction),
        *extra_args,
    ]
    if wrap is not None:
        command = wrap(command)
    base_url = f"http://{host}:{port}"
    logger.info("starting SGLang: %s (log %s)", " ".join(command), log_path)
    with managed_process(
        command,
        name=f"SGLang server at {base_url}",
        log_path=log_path,
        healthy=lambda: http_ok(f"{base_url}/health", timeout_s=5.0),
        startup_timeout_s=startup_timeout_s,
        poll_interval_s=poll_interval_s,
        stop_grace_s=stop_grace_s,
        env=env,
    ):
        logger.info("SGLang healthy at %s", base_url)
        yield base_url


# --------------------------------------------------------------------------------------------------
# learning curve


def append_curve_point(
    curve_path: str | Path, *, step: int, split: str, summary: Mapping[str, Any], before_training: bool = False
) -> None:
    """Write one learning-curve point (an eval of a training checkpoint) to the JSONL file the report plots;
    a point of the same (step, split, before_training) is replaced (searchr1.metrics_file.write_curve_point).
    ``step`` is slime's rollout id: the point before the first update is step 0 with ``before_training``."""
    from searchr1.metrics_file import write_curve_point

    point = {
        "step": int(step),
        "before_training": bool(before_training),
        "split": split,
        "em": summary["em"],
        "n": summary["n"],
        "ci95_low": summary["ci95"]["low"],
        "ci95_high": summary["ci95"]["high"],
        "searched_at_least_once": summary["searched_at_least_once"],
    }
    write_curve_point(curve_path, point)
