"""Evaluation: statistics on hand-checked fixtures, resumability, the HF path end to end, the SGLang launcher."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi import FastAPI, Request
from helpers import (
    EngineCrash,
    FakeRetriever,
    ScriptedEngine,
    agent_config,
    serve_app,
    serve_real_retriever,
    tiny_model,
    wait_dead,
)

import searchr1.agent
from searchr1.engines import GenerationRequest
from searchr1.evaluate import (
    JSONL_KEYS,
    append_curve_point,
    chat_prompt,
    eval_agent_config,
    evaluate_rows,
    evaluate_split,
    evaluate_with,
    load_split,
    partial_path,
    read_done,
    sglang_server,
)
from searchr1.prompt import make_messages
from searchr1.stats import failure_category, read_jsonl, summarize, summarize_rows, wilson_ci
from searchr1.toy.tokenizer import build_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
VOLATILE = {"started_at", "finished_at", "wall_time_s", "retriever_stats"}


# --------------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (4, 10, 0.1682, 0.6873),  # textbook values of the Wilson interval
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (1, 5, 0.0362, 0.6245),
        (50, 100, 0.4038, 0.5962),
    ],
)
def test_wilson_ci(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_ci(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize(("k", "n"), [(0, 0), (3, 2), (-1, 4)])
def test_wilson_ci_rejects_bad_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson_ci(k, n)


def test_summarize_fixture_base_nq() -> None:
    # outcomes R D N N N S A T R2 R (see tests/fixtures/make_eval_fixtures.py)
    s = summarize(FIXTURES / "eval" / "base" / "nq_test.jsonl")
    assert (s["n"], s["correct"], s["em"]) == (10, 4, 0.4)
    assert s["ci95"]["low"] == pytest.approx(0.16818, abs=1e-5)
    assert s["ci95"]["high"] == pytest.approx(0.68733, abs=1e-5)
    assert s["searched_at_least_once"] == 0.4
    assert s["mean_searches"] == 0.5  # 1 + 1 + 2 + 1 searches over 10
    assert s["answered"] == 0.8 and s["format_valid"] == 0.8
    assert s["grounded"] == 0.3 and s["golden_retrieved"] == 0.3
    assert s["mean_response_tokens"] == 23.0  # (30+12+12*3+30+12+40+40+30)/10
    assert s["status_counts"] == {"completed": 9, "truncated": 1}
    assert s["failure_counts"] == {"truncated": 1, "no answer": 1, "no search": 3, "answer not retrieved": 1}


def test_summarize_fixture_rl_hotpotqa() -> None:
    # outcomes R S R W R2
    s = summarize(FIXTURES / "eval" / "rl" / "hotpotqa_test.jsonl")
    assert (s["n"], s["correct"], s["em"]) == (5, 3, 0.6)
    assert s["mean_searches"] == pytest.approx(1.2)
    assert s["grounded"] == 0.6 and s["golden_retrieved"] == 0.8
    assert s["failure_counts"] == {"answer not retrieved": 1, "retrieved but wrong": 1}


def test_fixture_em_is_the_seed_verdict() -> None:
    # a response without an answer is scored on the prompt's own "<answer> Beijing </answer>"
    rows = read_jsonl(FIXTURES / "eval" / "base" / "nq_test.jsonl")
    no_answer = rows[6]
    assert no_answer["extracted_answer"] == "Beijing" and no_answer["em"] == 0.0
    assert failure_category(no_answer) == "no answer"
    assert failure_category(rows[0]) is None


def test_summarize_rejects_duplicates_and_empty(tmp_path: Path) -> None:
    rows = read_jsonl(FIXTURES / "eval" / "rl" / "hotpotqa_test.jsonl")
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]))
    with pytest.raises(ValueError, match="counted twice"):
        summarize(path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no evaluated questions"):
        summarize(tmp_path / "empty.jsonl")


def test_read_done_cuts_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "x.partial.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "em"')
    assert [r["id"] for r in read_done(path)] == ["a", "b"]
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')  # valid JSON but the newline never made it
    assert [r["id"] for r in read_done(path)] == ["a"]
    path.write_bytes(b'{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(ValueError, match="corrupt line"):
        read_done(path)


def test_eval_agent_config_uses_training_settings_at_eval_temperature() -> None:
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    agent = eval_agent_config(cfg)
    assert (agent.max_turns, agent.topk, agent.max_new_tokens, agent.temperature) == (2, 3, 512, 0.0)
    assert agent.on_retrieval_error == "fail"


def test_curve_points_append(tmp_path: Path) -> None:
    summary = summarize(FIXTURES / "eval" / "rl" / "nq_test.jsonl")
    append_curve_point(tmp_path / "curve.jsonl", step=5, split="nq_test", summary=summary)
    append_curve_point(tmp_path / "curve.jsonl", step=10, split="nq_test", summary=summary)
    points = read_jsonl(tmp_path / "curve.jsonl")
    assert [(p["step"], p["split"], p["em"]) for p in points] == [(5, "nq_test", 0.8), (10, "nq_test", 0.8)]


# --------------------------------------------------------------------------------------------------
# a split, a tokenizer, a scripted engine (a policy of the text it reads) and a fake retriever

CAPITALS = [
    ("france", "paris"),
    ("italy", "rome"),
    ("spain", "madrid"),
    ("peru", "lima"),
    ("chile", "santiago"),
    ("kenya", "nairobi"),
    ("egypt", "cairo"),
]


def _question(i: int) -> str:
    country = CAPITALS[i][0]
    # even questions make the scripted model search, odd ones answer at once (wrongly, "london")
    return f"{'search' if i % 2 == 0 else 'guess'} the capital of {country}"


def write_split(path: Path, n: int = 7) -> Path:
    rows = []
    for i in range(n):
        q = _question(i)
        rows.append(
            {
                "data_source": "nq",
                "prompt": make_messages(q),
                "ability": "fact-reasoning",
                "reward_model": {"style": "rule", "ground_truth": {"target": [CAPITALS[i][1].title()]}},
                "extra_info": {"split": "test", "index": i},
                "question": q,
                "id": f"test_{i}",
            }
        )
    pd.DataFrame(rows).to_parquet(path)
    return path


TEXTS = [f"{_question(i)} {c} {city} london" for i, (c, city) in enumerate(CAPITALS)] + ["look it up i know"]
TOKENIZER = build_tokenizer(TEXTS)


def question_in(prompt: str) -> str:
    return prompt.split("question :")[-1].split("?")[0].strip()


def capitals_policy(context: str) -> str:
    """The scripted model: an even question ("search the capital of X") searches X and answers the city its
    passage names; an odd one ("guess ...") answers "london" at once."""
    prompt, response = context.rsplit("<|im_start|> assistant", 1)
    if "<information>" in response:
        city = response.split("</information>")[0].split()[-2]  # "... the capital is paris . </information>"
        return f"<think> found it </think> <answer> {city} </answer>"
    question = question_in(prompt)
    if question.startswith("search"):
        return f"<think> look it up </think> <search> {question.split()[-1]} </search>"
    return "<think> i know </think> <answer> london </answer>"


def capitals_engine(crash_on_call: int | None = None) -> ScriptedEngine:
    return ScriptedEngine(TOKENIZER, capitals_policy, crash_on_call=crash_on_call)


def first_turn_questions(engine: ScriptedEngine) -> list[str]:
    """The questions the engine was asked for a first turn, in order."""
    return [question_in(context.rsplit("<|im_start|> assistant", 1)[0]) for turn, context in engine.turns if turn == 0]


def capital_retriever() -> FakeRetriever:
    """The country's passage, named by the query."""
    capital = dict(CAPITALS)
    return FakeRetriever(
        lambda q: [{"id": q, "contents": f'"{q}"\nthe capital is {capital.get(q.strip(), "unknown")}.'}]
    )


CFG = agent_config(max_turns=2, topk=3, max_new_tokens=32, temperature=0.0)


def run_eval(tmp: Path, split: Path, engine, *, fingerprint=None, max_rows=None) -> dict:
    rows = load_split(split, max_rows)
    return asyncio.run(
        evaluate_with(
            engine,
            capital_retriever(),
            TOKENIZER,
            rows=rows,
            out_jsonl=tmp / "eval" / "nq_test.jsonl",
            out_json=tmp / "eval" / "nq_test.json",
            agent_cfg=CFG,
            batch_size=3,
            fingerprint=fingerprint or {"model": "m1"},
            info={"model_label": "base", "split": "nq_test"},
            progress=False,
        )
    )


def test_load_split_reads_the_row_schema(tmp_path: Path) -> None:
    rows = load_split(write_split(tmp_path / "s.parquet"), max_questions=3)
    assert [r.id for r in rows] == ["test_0", "test_1", "test_2"]
    assert rows[1].golden_answers == ["Rome"] and rows[1].index == 1 and rows[1].data_source == "nq"
    assert rows[0].messages == make_messages(_question(0))
    with pytest.raises(FileNotFoundError, match="missing split parquet"):
        load_split(tmp_path / "nope.parquet")


def test_evaluate_rows_and_summary(tmp_path: Path) -> None:
    split = write_split(tmp_path / "s.parquet")
    summary = run_eval(tmp_path, split, capitals_engine())
    rows = read_jsonl(tmp_path / "eval" / "nq_test.jsonl")
    assert [r["id"] for r in rows] == [f"test_{i}" for i in range(7)]
    assert all(tuple(r) == JSONL_KEYS for r in rows)
    # the 4 even questions search and read the capital; the 3 odd ones answer "london"
    assert [r["em"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert rows[0]["queries"] == ["france"] and rows[0]["searches"] == 1
    assert rows[0]["extracted_answer"] == "paris" and rows[0]["grounded"] and rows[0]["golden_in_retrieved"]
    assert rows[1]["searches"] == 0 and rows[1]["extracted_answer"] == "london"
    assert rows[0]["prompt"] == chat_prompt(TOKENIZER, make_messages(_question(0)))
    assert rows[0]["trajectory"] == rows[0]["prompt"] + rows[0]["response"]
    assert rows[0]["total_response_tokens"] > rows[0]["response_tokens"] > 0  # observation tokens are not model's
    assert summary["em"] == pytest.approx(4 / 7) and summary["n"] == 7
    assert summary["searched_at_least_once"] == pytest.approx(4 / 7)
    assert summary["failure_counts"] == {"no search": 3}
    on_disk = json.loads((tmp_path / "eval" / "nq_test.json").read_text())
    assert on_disk["model_label"] == "base" and on_disk["temperature"] == 0.0 and on_disk["agent"]["topk"] == 3
    assert not partial_path(tmp_path / "eval" / "nq_test.jsonl").exists()


def test_in_memory_records_equal_the_file(tmp_path: Path) -> None:
    split = write_split(tmp_path / "s.parquet")
    run_eval(tmp_path, split, capitals_engine())
    records = asyncio.run(evaluate_rows(capitals_engine(), capital_retriever(), TOKENIZER, load_split(split), CFG, 2))
    assert records == read_jsonl(tmp_path / "eval" / "nq_test.jsonl")
    assert summarize_rows(records)["em"] == pytest.approx(4 / 7)


def _strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VOLATILE}


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    split = write_split(tmp_path / "s.parquet")
    straight = run_eval(tmp_path / "a", split, capitals_engine())

    # batch 1 (questions 0-2) takes two calls (turn 1, turn 2); the crash hits batch 2's first call
    with pytest.raises(EngineCrash):
        run_eval(tmp_path / "b", split, capitals_engine(crash_on_call=3))
    work = partial_path(tmp_path / "b" / "eval" / "nq_test.jsonl")
    assert [r["id"] for r in read_jsonl(work)] == ["test_0", "test_1", "test_2"]
    assert not (tmp_path / "b" / "eval" / "nq_test.json").exists()
    with open(work, "ab") as fh:  # and the process died in the middle of the next write
        fh.write(b'{"id": "test_3", "index": 3, "data_s')

    engine = capitals_engine()
    resumed = run_eval(tmp_path / "b", split, engine)
    assert first_turn_questions(engine) == [_question(i) for i in range(3, 7)]  # nothing done twice
    assert (tmp_path / "b" / "eval" / "nq_test.jsonl").read_bytes() == (
        tmp_path / "a" / "eval" / "nq_test.jsonl"
    ).read_bytes()
    assert _strip(resumed) == _strip(straight)
    on_disk = [json.loads((tmp_path / d / "eval" / "nq_test.json").read_text()) for d in ("a", "b")]
    assert _strip(on_disk[0]) == _strip(on_disk[1])


def test_progress_of_another_model_is_discarded(tmp_path: Path) -> None:
    split = write_split(tmp_path / "s.parquet")
    with pytest.raises(EngineCrash):
        run_eval(tmp_path, split, capitals_engine(crash_on_call=3), fingerprint={"model": "old"})
    engine = capitals_engine()
    run_eval(tmp_path, split, engine, fingerprint={"model": "new"})
    assert len(first_turn_questions(engine)) == 7


def test_extending_max_questions_reuses_done_rows(tmp_path: Path) -> None:
    split = write_split(tmp_path / "s.parquet")
    with pytest.raises(EngineCrash):
        run_eval(tmp_path, split, capitals_engine(crash_on_call=3))
    engine = capitals_engine()
    summary = run_eval(tmp_path, split, engine, max_rows=5)
    assert summary["n"] == 5 and first_turn_questions(engine) == [_question(3), _question(4)]


# --------------------------------------------------------------------------------------------------
# the HF engine path end to end: a tiny real model on disk, an HTTP retriever, evaluate_split


@pytest.fixture(scope="module")
def retriever_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Our real retriever app (MiniLM encoder, faiss index) over one passage per country, served in a thread."""
    passages = [{"id": str(i), "contents": f'"{c}"\nthe capital is {city}.'} for i, (c, city) in enumerate(CAPITALS)]
    with serve_real_retriever(passages, tmp_path_factory.mktemp("retriever")) as url:
        yield url


class Killed(RuntimeError):
    pass


def evaluate_one_split(**settings) -> dict:
    """evaluate_split on the nq_test split, with the retriever client's limits and the seed fixed here."""
    return evaluate_split(
        **{
            "split_label": "nq_test",
            "max_questions": None,
            "retriever_timeout_s": 60.0,
            "retriever_max_retries": 3,
            "retriever_concurrency": 256,
            "sglang_skip_special_tokens": False,  # agent.skip_special_tokens of config.yaml
            "seed": 0,
            "progress": False,
            **settings,
        }
    )


def test_evaluate_split_with_a_tiny_hf_model_resumes_identically(
    tmp_path: Path, monkeypatch, retriever_url: str
) -> None:
    model_dir = tmp_path / "model"
    tiny_model(TOKENIZER, layers=1, heads=2, max_positions=512).save_pretrained(str(model_dir))
    TOKENIZER.save_pretrained(str(model_dir))
    split = write_split(tmp_path / "s.parquet", n=5)
    cfg = agent_config(max_turns=2, topk=1, max_new_tokens=6, temperature=0.0)

    def run(out: Path) -> dict:
        return evaluate_one_split(
            model_dir=model_dir,
            split_parquet=split,
            out_jsonl=out / "rl" / "nq_test.jsonl",
            out_json=out / "rl" / "nq_test.json",
            retriever_url=retriever_url,
            agent_cfg=cfg,
            engine="hf",
            batch_size=2,
            model_label="rl",
        )

    real_run_agent = searchr1.agent.run_agent
    calls = {"n": 0}

    async def crashing_run_agent(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed("killed during batch 2")
        return await real_run_agent(*args, **kwargs)

    straight = run(tmp_path / "a")
    monkeypatch.setattr(searchr1.agent, "run_agent", crashing_run_agent)
    with pytest.raises(Killed):
        run(tmp_path / "b")
    monkeypatch.setattr(searchr1.agent, "run_agent", real_run_agent)
    resumed = run(tmp_path / "b")

    a, b = (tmp_path / d / "rl" / "nq_test.jsonl" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    assert _strip(straight) == _strip(resumed)
    rows = read_jsonl(a)
    assert len(rows) == 5 and all(0 < r["response_tokens"] for r in rows)
    assert straight["engine"] == "hf" and straight["model_label"] == "rl" and straight["n"] == 5


def test_evaluate_split_sglang_engine_with_the_real_retriever(tmp_path: Path, retriever_url: str) -> None:
    """engine="sglang" against an SGLang-shaped /generate double, and our real retriever server."""
    scripted = capitals_engine()
    policy = FastAPI()

    @policy.post("/generate")
    async def generate(request: Request) -> dict:
        payload = await request.json()
        params = payload["sampling_params"]
        assert payload["return_logprob"] and params["temperature"] == 0.0 and params["no_stop_trim"]
        (out,) = await scripted.generate(
            [
                GenerationRequest(
                    TOKENIZER.encode(payload["text"], add_special_tokens=False),
                    params["max_new_tokens"],
                    stop=params["stop"],
                )
            ]
        )
        pairs = [[lp, tid, None] for lp, tid in zip(out.logprobs, out.token_ids)]
        return {"text": out.text, "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": pairs}}

    model_dir = tmp_path / "model"  # SGLang holds the weights; the eval needs the tokenizer
    TOKENIZER.save_pretrained(str(model_dir))
    split = write_split(tmp_path / "s.parquet")
    starts = []
    with serve_app(policy) as sglang:
        summary = evaluate_one_split(
            model_dir=model_dir,
            split_parquet=split,
            out_jsonl=tmp_path / "out.jsonl",
            out_json=tmp_path / "out.json",
            retriever_url=lambda: starts.append(retriever_url) or retriever_url,  # started on the first search
            agent_cfg=agent_config(topk=1, max_new_tokens=32, temperature=0.0),
            engine="sglang",
            sglang_url=sglang,
            batch_size=4,
            model_label="base",
        )
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["em"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert rows[2]["queries"] == ["spain"] and rows[2]["extracted_answer"] == "madrid"
    assert summary["engine"] == "sglang" and summary["em"] == pytest.approx(4 / 7)
    assert summary["retriever_stats"]["requests"] >= 1
    assert starts == [retriever_url] and summary["retriever_url"] == retriever_url


def test_progress_made_with_another_index_is_not_resumed(tmp_path: Path, monkeypatch) -> None:
    """The inputs' records join the fingerprint of resumable progress: answers found with another index (or
    for a split file rewritten at the same path) are discarded, not reused."""
    seen = []

    async def record_fingerprint(engine, retriever, tokenizer, **kwargs):
        seen.append(kwargs["fingerprint"])
        return {"em": 0.0, "n": 0}

    monkeypatch.setattr(searchr1.evaluate, "evaluate_with", record_fingerprint)
    TOKENIZER.save_pretrained(str(tmp_path / "model"))
    split = write_split(tmp_path / "s.parquet")
    for index_hash in ("a", "b"):
        evaluate_one_split(
            model_dir=tmp_path / "model",
            split_parquet=split,
            out_jsonl=tmp_path / "o.jsonl",
            out_json=tmp_path / "o.json",
            retriever_url="http://127.0.0.1:1/retrieve",
            agent_cfg=agent_config(topk=1, max_new_tokens=8, temperature=0.0),
            engine="sglang",
            sglang_url="http://127.0.0.1:1",
            batch_size=4,
            model_label="base",
            inputs_record={"index": {"settings_hash": index_hash}},
        )
    assert [f["inputs"] for f in seen] == [{"index": {"settings_hash": "a"}}, {"index": {"settings_hash": "b"}}]
    assert seen[0] != seen[1]


def test_a_model_that_never_searches_never_starts_the_retriever(tmp_path: Path) -> None:
    policy = FastAPI()

    @policy.post("/generate")
    async def generate(request: Request) -> dict:
        text = "<think> easy </think> <answer> paris </answer>"
        pairs = [[-0.1, tid, None] for tid in TOKENIZER.encode(text, add_special_tokens=False)]
        return {"text": text, "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": pairs}}

    def start() -> str:
        raise AssertionError("the retriever was started")

    TOKENIZER.save_pretrained(str(tmp_path / "model"))
    with serve_app(policy) as sglang:
        summary = evaluate_one_split(
            model_dir=tmp_path / "model",
            split_parquet=write_split(tmp_path / "s.parquet"),
            out_jsonl=tmp_path / "out.jsonl",
            out_json=tmp_path / "out.json",
            retriever_url=start,
            agent_cfg=agent_config(topk=1, max_new_tokens=32, temperature=0.0),
            engine="sglang",
            sglang_url=sglang,
            batch_size=4,
            model_label="base",
        )
    assert summary["n"] == 7 and summary["searched_at_least_once"] == 0.0 and summary["answered"] == 1.0
    assert summary["retriever_url"] is None and summary["retriever_stats"]["requests"] == 0


# --------------------------------------------------------------------------------------------------
# the SGLang launcher, against a stand-in module named sglang.launch_server

FAKE_SGLANG = textwrap.dedent("""
    import argparse, http.server, os, sys
    p = argparse.ArgumentParser()
    for flag in ("--model-path", "--host", "--port", "--tp-size", "--mem-fraction-static"):
        p.add_argument(flag, required=True)
    p.add_argument("--fail", action="store_true")
    a = p.parse_args()
    print("fake sglang", a.model_path, a.tp_size, a.mem_fraction_static, flush=True)
    if a.fail:
        sys.exit("model not found")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(str(os.getpid()).encode())
        def log_message(self, *args):
            pass
    http.server.HTTPServer((a.host, int(a.port)), H).serve_forever()
    """)


@pytest.fixture
def fake_sglang_env(tmp_path: Path) -> dict[str, str]:
    pkg = tmp_path / "fake" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "launch_server.py").write_text(FAKE_SGLANG)
    return {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}


def test_sglang_server_starts_waits_and_stops(tmp_path: Path, fake_sglang_env: dict[str, str]) -> None:
    log = tmp_path / "sglang.log"
    with sglang_server(
        "/models/x", tp=2, mem_fraction=0.5, log_path=log, env=fake_sglang_env, poll_interval_s=0.1
    ) as url:
        assert url.startswith("http://127.0.0.1:")
        reply = httpx.get(f"{url}/health", trust_env=False)
        assert reply.status_code == 200
        pid = int(reply.text)
    assert wait_dead(pid)  # every exit path: test_process.py
    assert "fake sglang /models/x 2 0.5" in log.read_text()


def test_sglang_server_that_dies_is_reported_with_its_log(tmp_path: Path, fake_sglang_env: dict[str, str]) -> None:
    with pytest.raises(RuntimeError, match="(?s)exited with code 1.*model not found"):
        with sglang_server(
            "/models/x",
            tp=1,
            mem_fraction=0.5,
            log_path=tmp_path / "s.log",
            env=fake_sglang_env,
            extra_args=["--fail"],
            poll_interval_s=0.1,
        ):
            pass


def test_lowering_max_questions_leaves_extra_done_rows_out(tmp_path: Path) -> None:
    split = write_split(tmp_path / "s.parquet")
    with pytest.raises(EngineCrash):
        run_eval(tmp_path, split, capitals_engine(crash_on_call=3))  # questions 0-2 done
    engine = capitals_engine()
    summary = run_eval(tmp_path, split, engine, max_rows=2)
    assert summary["n"] == 2 and first_turn_questions(engine) == []
    assert [r["id"] for r in read_jsonl(tmp_path / "eval" / "nq_test.jsonl")] == ["test_0", "test_1"]
