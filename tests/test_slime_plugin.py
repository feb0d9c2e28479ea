"""The slime plugin end to end: slime stand-in + scripted SGLang server + our real retriever server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import slime_standin
from fastapi import FastAPI, Request
from helpers import bpe_tokenizer, config, free_port, serve_app, serve_real_retriever
from test_agent import chat

from searchr1 import slime_plugin
from searchr1.agent import observation_text
from searchr1.retrieval.client import RetrievalError
from searchr1.slime_launch import custom_config

PASSAGES = [
    {"id": "0", "contents": '"The Hobbit"\nThe Hobbit is a fantasy novel written by J. R. R. Tolkien.'},
    {"id": "1", "contents": '"Paris"\nParis is the capital and largest city of France.'},
    {"id": "2", "contents": '"Photosynthesis"\nPlants convert light energy into chemical energy.'},
    {"id": "3", "contents": '"Mount Everest"\nEverest is the highest mountain above sea level.'},
]
SEARCH_TURN = "<think> I should look it up. </think>\n<search> who wrote the hobbit </search>"
ANSWER_TURN = "<think> The passage says Tolkien. </think>\n<answer> J. R. R. Tolkien </answer>"
GOLDEN = {"ground_truth": {"target": ["J. R. R. Tolkien", "Tolkien"]}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def retriever_url(tmp_path_factory):
    """Our real retriever server (searchr1.retrieval.server) over a 4-passage corpus, MiniLM + faiss."""
    with serve_real_retriever(PASSAGES, tmp_path_factory.mktemp("corpus")) as url:
        yield url


def make_policy_app(tokenizer, behaviour: dict) -> FastAPI:
    """SGLang-shaped /generate that 'reads' its input: search first, answer once information is there."""
    app = FastAPI()

    @app.post("/generate")
    async def generate(request: Request):
        payload = await request.json()
        seen = payload["text"] if "text" in payload else tokenizer.decode(payload["input_ids"])
        reason = behaviour.get("finish_reason", "stop")
        text = ANSWER_TURN if seen.count("<information>") >= 2 else SEARCH_TURN  # the prompt holds one
        if reason == "abort":
            return {"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "scripted"}}}
        ids = tokenizer.encode(text, add_special_tokens=False)
        return {
            "text": text,
            "meta_info": {
                "finish_reason": {"type": reason},
                "output_token_logprobs": [[-0.5 - i / 100, t, None] for i, t in enumerate(ids)],
                "weight_version": "7",
            },
        }

    return app


def make_args(tokenizer_dir, sglang_base: str, retriever_url: str, tmp_path, **overrides):
    host, port = sglang_base.removeprefix("http://").split(":")
    # Our keys as slime sets them on args from --custom-config-path: the file slime_launch writes.
    ours = custom_config(config(), retriever_url, tmp_path / "metrics.jsonl", tmp_path / "eval_metrics.jsonl")
    args = SimpleNamespace(
        **ours,
        sglang_router_ip=host,
        sglang_router_port=int(port),
        hf_checkpoint=str(tokenizer_dir),
        partial_rollout=False,
        n_samples_per_prompt=2,
        reward_key=None,
    )
    args.search_topk, args.search_max_retries = 2, 0
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


SAMPLING_PARAMS = dict(
    temperature=1.0,
    top_p=1.0,
    top_k=-1,
    max_new_tokens=64,
    stop=["<|im_end|>"],
    stop_token_ids=[2],
    skip_special_tokens=True,
    no_stop_trim=True,
    spaces_between_special_tokens=False,
)


def run_plugin(args, samples, sampling_params=SAMPLING_PARAMS, evaluation=False):
    async def main():
        try:
            out = await asyncio.gather(
                *(slime_plugin.generate(args, s, dict(sampling_params), evaluation=evaluation) for s in samples)
            )
            for s in out:
                if s.status != slime_standin.Sample.Status.ABORTED:
                    s.reward = await slime_plugin.reward_func(args, s)
            return out
        finally:
            await slime_plugin.aclose_retrievers()
            await slime_standin.close_http_client()

    return asyncio.run(main())


@pytest.fixture
def slime(monkeypatch):
    slime_standin.install(monkeypatch)
    return slime_standin


def test_generate_fills_the_sample_like_slime(slime, tokenizer, tokenizer_dir, retriever_url, tmp_path):
    Sample = slime.Sample
    with serve_app(make_policy_app(tokenizer, {})) as sglang:
        args = make_args(tokenizer_dir, sglang, retriever_url, tmp_path)
        sample = Sample(prompt=chat("who wrote the hobbit"), label=GOLDEN, index=0)
        (out,) = run_plugin(args, [sample])
    assert out is sample
    assert "The Hobbit is a fantasy novel" in out.response
    prompt_ids = tokenizer.encode(sample.prompt, add_special_tokens=False)
    search_ids = tokenizer.encode(SEARCH_TURN, add_special_tokens=False)
    answer_ids = tokenizer.encode(ANSWER_TURN, add_special_tokens=False)
    obs_text = out.response[len(SEARCH_TURN) : -len(ANSWER_TURN)]
    # The real retriever's top-2: the Hobbit passage first, then one of the others.
    assert obs_text in [observation_text([PASSAGES[0], other]) for other in PASSAGES[1:]]
    obs_ids = tokenizer.encode(obs_text, add_special_tokens=False)
    assert out.response == SEARCH_TURN + obs_text + ANSWER_TURN
    assert out.tokens == prompt_ids + search_ids + obs_ids + answer_ids
    assert out.response_length == len(search_ids) + len(obs_ids) + len(answer_ids)
    assert out.loss_mask == [1] * len(search_ids) + [0] * len(obs_ids) + [1] * len(answer_ids)
    assert out.rollout_log_probs[: len(search_ids)] == [-0.5 - i / 100 for i in range(len(search_ids))]
    assert out.rollout_log_probs[len(search_ids) : len(search_ids) + len(obs_ids)] == [0.0] * len(obs_ids)
    assert out.status == Sample.Status.COMPLETED
    assert out.weight_versions == ["7", "7"]
    assert out.metadata["num_searches"] == 1
    assert out.metadata["queries"] == ["who wrote the hobbit"]
    assert out.metadata["answered"] and out.metadata["format_valid"]
    assert out.metadata["retrieval_failures"] == 0
    assert out.reward == 1.0
    # What went to SGLang: the context as text (slime's example), slime's sampling params plus the agent's
    # stop strings.
    url, first = slime.POSTED[0]
    assert url == f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    assert first["text"] == out.prompt and "input_ids" not in first
    assert first["return_logprob"] is True
    params = first["sampling_params"]
    assert params["stop"] == ["<|im_end|>", "</search>", "</answer>"]
    assert params["stop_token_ids"] == [2] and params["no_stop_trim"] is True
    assert params["max_new_tokens"] == 64
    assert slime.POSTED[1][1]["text"] == out.prompt + SEARCH_TURN + obs_text


def test_token_ids_input_mode(slime, tokenizer, tokenizer_dir, retriever_url, tmp_path):
    """search_input_mode token_ids: the context goes as the exact ids trained on, never re-tokenised."""
    Sample = slime.Sample
    with serve_app(make_policy_app(tokenizer, {})) as sglang:
        args = make_args(tokenizer_dir, sglang, retriever_url, tmp_path, search_input_mode="token_ids")
        slime.POSTED.clear()
        (out,) = run_plugin(args, [Sample(prompt=chat("who wrote the hobbit"), label=GOLDEN)])
    prompt_len = len(out.tokens) - out.response_length
    search_len = len(tokenizer.encode(SEARCH_TURN, add_special_tokens=False))
    assert [p["input_ids"] for _, p in slime.POSTED] == [
        out.tokens[:prompt_len],
        out.tokens[: len(out.tokens) - len(tokenizer.encode(ANSWER_TURN, add_special_tokens=False))],
    ]
    assert all("text" not in p for _, p in slime.POSTED) and search_len > 0 and out.reward == 1.0


def test_truncated_and_aborted_status(slime, tokenizer, tokenizer_dir, retriever_url, tmp_path):
    Sample = slime.Sample
    behaviour = {"finish_reason": "length"}
    with serve_app(make_policy_app(tokenizer, behaviour)) as sglang:
        args = make_args(tokenizer_dir, sglang, retriever_url, tmp_path)
        (out,) = run_plugin(args, [Sample(prompt=chat("who wrote the hobbit"), label=GOLDEN)])
        assert out.status == Sample.Status.TRUNCATED
        assert out.response == SEARCH_TURN and out.metadata["num_searches"] == 0
        assert out.loss_mask == [1] * out.response_length
        behaviour["finish_reason"] = "abort"
        (out,) = run_plugin(args, [Sample(prompt=chat("who wrote the hobbit"), label=GOLDEN)])
        assert out.status == Sample.Status.ABORTED
        assert out.response_length == 0 and out.reward is None


def test_retrieval_errors_fail_or_degrade(slime, tokenizer, tokenizer_dir, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/retrieve"
    with serve_app(make_policy_app(tokenizer, {})) as sglang:
        args = make_args(tokenizer_dir, sglang, dead, tmp_path, search_timeout_s=2.0)
        with pytest.raises(RetrievalError, match="unreachable"):
            run_plugin(args, [slime.Sample(prompt=chat("who wrote the hobbit"), label=GOLDEN)])
        args.search_on_error = "degrade"
        (out,) = run_plugin(args, [slime.Sample(prompt=chat("who wrote the hobbit"), label=GOLDEN)])
    assert "<information></information>" in out.response
    assert out.metadata["retrieval_failures"] == 1
    assert out.status == slime.Sample.Status.COMPLETED


def test_prompt_must_be_templated_and_partial_rollout_refused(slime, tokenizer_dir, tmp_path):
    args = make_args(tokenizer_dir, "http://127.0.0.1:1", "http://127.0.0.1:1/retrieve", tmp_path)
    with pytest.raises(TypeError, match="--apply-chat-template"):
        run_plugin(args, [slime.Sample(prompt=[{"role": "user", "content": "q"}], label=GOLDEN)])
    args.partial_rollout = True
    with pytest.raises(ValueError, match="partial-rollout"):
        run_plugin(args, [slime.Sample(prompt="x", label=GOLDEN)])


def reward_args(structure=0.0, final=0.0, retrieval=0.0, **keys):
    """slime's args as our custom config (reward.* scores) and slime's reward flags set them."""
    scores = {"structure_format_score": structure, "final_format_score": final, "retrieval_score": retrieval}
    ours = custom_config(config(reward=scores), "http://127.0.0.1:1/retrieve", "m.jsonl")
    return SimpleNamespace(**ours, **{"reward_key": None, "eval_reward_key": None, **keys})


def test_reward_func_uses_prompt_plus_response(slime):
    args = reward_args()
    prompt = chat("who wrote the hobbit")

    def reward(response, label=GOLDEN):
        sample = slime.Sample(prompt=prompt, response=response, label=label)
        return asyncio.run(slime_plugin.reward_func(args, sample))

    assert reward("<answer> Tolkien </answer>") == 1.0
    assert type(reward("<answer> Tolkien </answer>")) is float  # the seed recipe: a float, slime without --reward-key
    assert reward("<answer> Lewis </answer>") == 0.0
    assert reward("<think> no answer </think>", {"ground_truth": {"target": ["Beijing"]}}) == 1.0
    with pytest.raises(ValueError, match="reward_model dict"):
        reward("x", label="Tolkien")


VALID_RIGHT = "<think> easy </think>\n<answer> Tolkien </answer>"
VALID_WRONG = "<think> hm </think>\n<answer> Lewis </answer>"


def test_reward_func_shaped_reward_is_a_dict_slime_reads_by_key(slime):
    """A non-zero score: {"score": Search-R1's compute_score_em, "em": exact match, "format_valid"}; slime's
    Sample.get_reward_value(args) (the training reward, --reward-key score) is the shaped value, its evaluation
    (--eval-reward-key em) the exact match (hand-computed: structure 0.2, final 0.1)."""
    args = reward_args(0.2, 0.1, reward_key="score", eval_reward_key="em")
    prompt = chat("who wrote the hobbit")

    def sample(response):
        s = slime.Sample(prompt=prompt, response=response, label=GOLDEN)
        s.reward = asyncio.run(slime_plugin.reward_func(args, s))
        return s

    cases = {
        VALID_RIGHT: (1.0, 1.0, 1.0),
        "<answer> Tolkien </answer>": (0.8, 1.0, 0.0),  # right, format invalid (no think): 1 - 0.2
        VALID_WRONG: (0.2, 0.0, 1.0),
        "<answer> Lewis </answer>": (0.1, 0.0, 0.0),
        "<think> no answer </think>": (0.1, 0.0, 0.0),  # scored as the prompt's "Beijing": wrong, invalid
    }
    for response, (shaped, em, valid) in cases.items():
        s = sample(response)
        assert s.reward == {"score": pytest.approx(shaped), "em": em, "format_valid": valid}, response
        assert s.get_reward_value(args) == pytest.approx(shaped)
        assert s.reward[args.eval_reward_key] == em
    assert sample("<answer> Tolkien </answer>").reward["score"] == 1.0 - 0.2  # Search-R1's arithmetic, bit for bit


def test_reward_func_refuses_mismatched_flags_and_a_prompt_without_the_assistant_marker(slime):
    from searchr1.reward import RewardConfigError

    label = GOLDEN
    shaped_without_keys = reward_args(0.2, 0.1)
    s = slime.Sample(prompt=chat("q"), response=VALID_RIGHT, label=label)
    with pytest.raises(slime_plugin.PluginConfigError, match="--reward-key score --eval-reward-key em"):
        asyncio.run(slime_plugin.reward_func(shaped_without_keys, s))
    with pytest.raises(slime_plugin.PluginConfigError, match="reward_key='em'"):
        asyncio.run(slime_plugin.reward_func(reward_args(0.2, reward_key="em", eval_reward_key="score"), s))
    plain = slime.Sample(prompt="User: who wrote the hobbit?\nAssistant:", response=VALID_RIGHT, label=label)
    with pytest.raises(RewardConfigError, match="no '<\\|im_start\\|>assistant' marker"):
        asyncio.run(slime_plugin.reward_func(reward_args(0.2, reward_key="score", eval_reward_key="em"), plain))
    # exact match needs no marker (the seed recipe scores any prompt)
    assert asyncio.run(slime_plugin.reward_func(reward_args(), plain)) == 0.0
    with pytest.raises(slime_plugin.PluginConfigError, match="search_structure_format_score"):
        asyncio.run(slime_plugin.reward_func(SimpleNamespace(), s))


def _done_sample(slime, reward, searches, status="COMPLETED", mask=(1, 1, 0, 1)):
    return slime.Sample(
        prompt=chat("who wrote the hobbit"),
        response="<answer> Tolkien </answer>" if reward else "<answer> Lewis </answer>",
        label=GOLDEN,
        reward=float(reward),
        loss_mask=list(mask),
        response_length=len(mask),
        status=getattr(slime.Sample.Status, status),
        metadata={"num_searches": searches, "answered": True, "format_valid": False, "retrieval_failures": 0},
        index=searches,
    )


def test_log_rollout_appends_common_metrics(slime, tmp_path):
    args = SimpleNamespace(search_metrics_path=str(tmp_path / "m" / "metrics.jsonl"), n_samples_per_prompt=2)
    samples = [
        _done_sample(slime, 1, 1),
        _done_sample(slime, 1, 0),
        _done_sample(slime, 0, 2, "TRUNCATED"),
        _done_sample(slime, 1, 1),
    ]
    assert slime_plugin.log_rollout(0, args, samples, {"perf/x": 1.5, "note": "s"}, 12.0) is False
    assert slime_plugin.log_rollout(1, args, samples[:2], None, 3.0) is False
    lines = [json.loads(line) for line in Path(args.search_metrics_path).read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    first = lines[0]
    assert first["reward_mean"] == pytest.approx(0.75) and first["em_mean"] == pytest.approx(0.75)
    assert first["response_len_mean"] == 3 and first["response_len_total_mean"] == 4
    assert first["searches_mean"] == 1.0 and first["search_rate"] == 0.75
    assert first["truncated_ratio"] == 0.25
    assert first["zero_std_group_frac"] == 0.5
    assert first["wall_time_s"] == 12.0 and first["rollout_time_s"] == 12.0
    assert first["slime/perf/x"] == 1.5 and "slime/note" not in first
    assert lines[1]["wall_time_s"] >= 0 and lines[1]["rollout_time_s"] == 3.0
    assert slime_plugin.log_rollout(2, SimpleNamespace(), samples, None, 1.0) is False  # no path: no file, no crash


def test_log_rollout_with_a_shaped_reward_keeps_reward_and_em_apart(slime, tmp_path):
    args = SimpleNamespace(
        search_metrics_path=str(tmp_path / "metrics.jsonl"), n_samples_per_prompt=2, reward_key="score"
    )
    samples = [_done_sample(slime, 1, 1), _done_sample(slime, 0, 1)]
    samples[0].reward = {"score": 0.8, "em": 1.0, "format_valid": 0.0}  # right answer, invalid format
    samples[1].reward = {"score": 0.1, "em": 0.0, "format_valid": 0.0}
    slime_plugin.log_rollout(0, args, samples, None, 1.0)
    (line,) = [json.loads(x) for x in Path(args.search_metrics_path).read_text().splitlines()]
    assert line["reward_mean"] == pytest.approx(0.45) and line["em_mean"] == 0.5
    assert line["format_valid_rate"] == 0.0 and line["zero_std_group_frac"] == 0.0


def test_log_eval_marks_the_point_before_training(slime, tmp_path, monkeypatch):
    """slime's train.py evaluates before the first update as rollout 0 and, with --eval-interval 1, after rollout
    0 as rollout 0 again: both points are kept, the first marked before_training."""
    monkeypatch.setattr(slime_plugin, "_rollouts_logged", set())
    args = SimpleNamespace(search_eval_metrics_path=str(tmp_path / "eval.jsonl"), n_samples_per_prompt=2)
    data = {"nq_test": {"rewards": [0.0], "truncated": [False], "samples": [_done_sample(slime, 0, 0)]}}
    slime_plugin.log_eval(0, args, data, {})
    slime_plugin.log_rollout(0, args, [_done_sample(slime, 1, 1)], None, 1.0)
    data = {"nq_test": {"rewards": [1.0], "truncated": [False], "samples": [_done_sample(slime, 1, 1)]}}
    slime_plugin.log_eval(0, args, data, {})
    slime_plugin.log_eval(0, args, data, {})  # logged again (a resume): replaced
    points = [json.loads(x) for x in Path(args.search_eval_metrics_path).read_text().splitlines()]
    assert [(p["step"], p["before_training"], p["em"]) for p in points] == [(0, True, 0.0), (0, False, 1.0)]


def test_log_eval_appends_per_dataset_and_per_question(slime, tmp_path):
    args = SimpleNamespace(
        search_eval_metrics_path=str(tmp_path / "eval.jsonl"), search_eval_samples_dir=str(tmp_path / "rows")
    )
    nq = [_done_sample(slime, 1, 1), _done_sample(slime, 0, 0)]
    hotpot = [_done_sample(slime, 1, 2)]
    data = {
        "nq_test": {"rewards": [1.0, 0.0], "truncated": [False, False], "samples": nq},
        "hotpotqa_test": {"rewards": [1.0], "truncated": [False], "samples": hotpot},
    }
    assert slime_plugin.log_eval(0, args, data, {}) is False
    records = [json.loads(line) for line in Path(args.search_eval_metrics_path).read_text().splitlines()]
    assert [(r["step"], r["dataset"], r["n"], r["em_mean"]) for r in records] == [
        (0, "nq_test", 2, 0.5),
        (0, "hotpotqa_test", 1, 1.0),
    ]
    rows = [json.loads(x) for x in (tmp_path / "rows" / "nq_test" / "step_0.jsonl").read_text().splitlines()]
    assert [(r["em"], r["extracted_answer"], r["num_searches"]) for r in rows] == [
        (1.0, "Tolkien", 1),
        (0.0, "Lewis", 0),
    ]
    # the learning-curve point the report plots: EM with its 95% (Wilson) interval, as the torch backend writes it
    assert (records[0]["split"], records[0]["em"], records[0]["n"]) == ("nq_test", 0.5, 2)
    assert records[0]["ci95_low"] < 0.5 < records[0]["ci95_high"]
    # Logging the same step again (slime after a resume) replaces its rows and its curve points.
    slime_plugin.log_eval(0, args, data, {})
    assert len((tmp_path / "rows" / "nq_test" / "step_0.jsonl").read_text().splitlines()) == 2
    again = [json.loads(line) for line in Path(args.search_eval_metrics_path).read_text().splitlines()]
    assert [(r["step"], r["dataset"]) for r in again] == [(0, "nq_test"), (0, "hotpotqa_test")]


def test_agent_config_from_args_reads_the_custom_config_and_names_a_missing_key():
    ours = custom_config(config(), "http://127.0.0.1:1/retrieve", "m.jsonl")
    cfg = slime_plugin.agent_config_from_args(SimpleNamespace(**ours), SAMPLING_PARAMS)
    assert (cfg.max_turns, cfg.topk, cfg.on_retrieval_error, cfg.max_new_tokens) == (2, 3, "fail", 64)
    with pytest.raises(slime_plugin.PluginConfigError, match="search_topk"):
        slime_plugin.agent_config_from_args(SimpleNamespace(search_max_turns=2), SAMPLING_PARAMS)
    cfg = slime_plugin.agent_config_from_args(
        SimpleNamespace(search_max_turns=4, search_topk=5, search_on_error="degrade"),
        {**SAMPLING_PARAMS, "temperature": 0.0, "top_k": 1},
    )
    assert (cfg.max_turns, cfg.topk, cfg.on_retrieval_error, cfg.temperature, cfg.top_k) == (4, 5, "degrade", 0.0, 1)


def test_plugin_imports_without_slime():
    code = "import sys, searchr1.slime_plugin; assert not any(m.split('.')[0] == 'slime' for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
