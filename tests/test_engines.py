"""Engines: HFEngine's sampling loop against a cache-free reference (the toy world's tiny policy, a byte-level BPE
tokenizer), and SGLangEngine against a scripted server."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from helpers import bpe_tokenizer, free_port, serve_app, tiny_model

from searchr1.engines import (
    Engine,
    EngineError,
    GenerationOutput,
    GenerationRequest,
    HFEngine,
    SGLangEngine,
    parse_sglang_output,
)

# ----------------------------------------------------------------------------------------------
# HFEngine
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer, sharpen=20.0)


def reference_step_logits(model, ids: list[int]) -> torch.Tensor:
    """Last-position logits from one full forward pass: no cache, no padding."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(n):
        logits = reference_step_logits(model, ids)
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
    return tokens, logprobs


PROMPTS = ["who wrote the hobbit?", "<think> It was", "Answer the given question. Question: who wrote"]


def test_greedy_batch_with_left_padding_matches_reference(model, tokenizer):
    engine = HFEngine(model, tokenizer, seed=0)
    engine.eos_token_ids = set()  # compare full-length sequences
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    outputs = asyncio.run(engine.generate([GenerationRequest(p, 6, temperature=0.0) for p in prompts]))
    for prompt, out in zip(prompts, outputs, strict=True):
        tokens, logprobs = reference_greedy(model, prompt, 6)
        assert out.token_ids == tokens
        assert out.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert out.finish_reason == "length"
        assert out.text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_sampled_logprobs_are_temperature_scaled_log_softmax(model, tokenizer):
    engine = HFEngine(model, tokenizer, seed=123)
    engine.eos_token_ids = set()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    outputs = engine.generate_sync([GenerationRequest(p, 5, temperature=0.7) for p in prompts])
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = list(prompt)
        for token, logprob in zip(out.token_ids, out.logprobs, strict=True):
            expected = torch.log_softmax(reference_step_logits(model, ids) / 0.7, -1)[token]
            assert logprob == pytest.approx(float(expected), abs=1e-4)
            ids.append(token)


def test_seeded_sampling_is_reproducible(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    requests = [GenerationRequest(p, 8, temperature=1.5) for p in prompts]

    def run(seed):
        engine = HFEngine(model, tokenizer, seed=seed)
        engine.eos_token_ids = set()
        return [o.token_ids for o in engine.generate_sync(requests)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_one_is_greedy_and_top_p_restricts(model, tokenizer):
    engine = HFEngine(model, tokenizer, seed=1)
    engine.eos_token_ids = set()
    prompt = tokenizer.encode(PROMPTS[0])
    greedy = engine.generate_sync([GenerationRequest(prompt, 5, temperature=0.0)])[0]
    top_k = engine.generate_sync([GenerationRequest(prompt, 5, temperature=1.0, top_k=1)])[0]
    top_p = engine.generate_sync([GenerationRequest(prompt, 5, temperature=1.0, top_p=1e-6)])[0]
    assert top_k.token_ids == greedy.token_ids == top_p.token_ids
    # The logprob is reported before filtering: a proper log-probability, not 0.
    assert all(lp < 0 for lp in top_k.logprobs)


def test_batches_larger_than_max_batch_size_keep_order(model, tokenizer):
    engine = HFEngine(model, tokenizer, max_batch_size=2, seed=0)
    engine.eos_token_ids = set()
    prompts = [tokenizer.encode(p) for p in PROMPTS] * 2
    outputs = engine.generate_sync([GenerationRequest(p, 3, temperature=0.0) for p in prompts])
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == reference_greedy(model, prompt, 3)[0]


def test_finished_rows_leave_the_batch_with_the_same_tokens(model, tokenizer):
    """A row that finishes leaves the decode batch (and its KV cache); the rows still decoding get the
    tokens and logprobs they get when every row decodes to the end (same sampling stream, bit for bit)."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def run(budgets):
        engine = HFEngine(model, tokenizer, seed=5)
        engine.eos_token_ids = set()
        rows = []
        forward = engine._forward
        engine._forward = lambda ids, *a: (rows.append(ids.shape[0]), forward(ids, *a))[1]
        outs = engine.generate_sync([GenerationRequest(p, b, temperature=1.0) for p, b in zip(prompts, budgets)])
        return outs, rows

    full, full_rows = run([6, 6, 6])
    short, short_rows = run([1, 3, 6])
    assert full_rows == [3] * 6
    assert short_rows == [3, 2, 2, 1, 1, 1]  # the budget-1 row leaves after step 1, the budget-3 row after 3
    for out, ref, budget in zip(short, full, [1, 3, 6]):
        assert out.token_ids == ref.token_ids[:budget]
        assert out.logprobs == ref.logprobs[:budget]  # exact: the row's numbers do not depend on the others


class _StepCache:
    """ScriptedLM's KV cache: only the decode step, plus the rows the engine kept (``batch_select_indices``)."""

    def __init__(self, step: int, rows: int):
        self.step, self.rows = step, rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows = len(indices)


class _FixedStepCache:
    """A step cache without row selection: the engine must keep every row in the batch."""

    def __init__(self, step: int, rows: int):
        self.step, self.rows = step, rows


class ScriptedLM(torch.nn.Module):
    """Test double: emits a fixed token script whatever the input (to test stopping rules exactly)."""

    def __init__(self, script: list[int], vocab_size: int, eos_token_id=None, selectable_cache: bool = True):
        super().__init__()
        self.script = script
        self.cache_type = _StepCache if selectable_cache else _FixedStepCache
        self.vocab_size = vocab_size
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id)
        self.seen_inputs: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        self.seen_inputs.append(input_ids.clone())
        step = past_key_values.step if past_key_values is not None else 0
        if past_key_values is not None:
            assert past_key_values.rows == input_ids.shape[0], "cache rows and input rows disagree"
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab_size), -10.0)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=self.cache_type(step + 1, input_ids.shape[0]))


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_stop_string_glued_to_text_is_kept(tokenizer):
    script = _ids(tokenizer, "<search> hobbit </search>ing more words")
    lm = ScriptedLM(script, len(tokenizer))
    engine = HFEngine(lm, tokenizer, seed=0)
    out = engine.generate_sync([GenerationRequest([5, 6], 50, stop=["</search>", "</answer>"])])[0]
    assert out.finish_reason == "stop"
    assert "</search>" in out.text
    assert not out.text.endswith("more words")
    # Stops at the first token whose decoded text completes the tag.
    n = len(out.token_ids)
    assert "</search>" not in tokenizer.decode(out.token_ids[: n - 1])
    assert out.token_ids == script[:n]


def test_eos_from_generation_config_stops_and_is_kept(tokenizer):
    eos_extra = _ids(tokenizer, "Tolkien")[0]
    script = _ids(tokenizer, "hello ") + [eos_extra] + _ids(tokenizer, "more")
    engine = HFEngine(ScriptedLM(script, len(tokenizer), eos_token_id=[eos_extra]), tokenizer, seed=0)
    out = engine.generate_sync([GenerationRequest([5], 20)])[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == eos_extra
    assert len(out.token_ids) == len(_ids(tokenizer, "hello ")) + 1


def test_tokenizer_eos_is_skipped_in_text(tokenizer):
    script = _ids(tokenizer, "hi") + [tokenizer.eos_token_id]
    engine = HFEngine(ScriptedLM(script, len(tokenizer)), tokenizer, seed=0)
    out = engine.generate_sync([GenerationRequest([5], 20)])[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == tokenizer.eos_token_id
    assert out.text == "hi"


@pytest.mark.parametrize("selectable", [True, False])
def test_length_and_zero_budget_and_mixed_budgets(tokenizer, selectable):
    script = _ids(tokenizer, "who wrote the hobbit who wrote the hobbit")
    lm = ScriptedLM(script, len(tokenizer), selectable_cache=selectable)
    engine = HFEngine(lm, tokenizer, seed=0)
    outs = engine.generate_sync([GenerationRequest([5], 3), GenerationRequest([5, 6, 7], 0), GenerationRequest([5], 5)])
    assert [len(o.token_ids) for o in outs] == [3, 0, 5]
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert outs[1].text == ""
    # Rows per forward: finished rows leave a cache that can select rows; otherwise all keep decoding.
    assert [x.shape[0] for x in lm.seen_inputs] == ([3, 2, 2, 1, 1] if selectable else [3] * 5)


def test_left_padding_layout(tokenizer):
    lm = ScriptedLM([7], len(tokenizer))
    engine = HFEngine(lm, tokenizer, seed=0)
    engine.generate_sync([GenerationRequest([1, 2, 3], 1), GenerationRequest([4], 1)])
    first = lm.seen_inputs[0]
    assert first.shape == (2, 3)
    rows = {tuple(r) for r in first.tolist()}
    assert rows == {(1, 2, 3), (engine.pad_token_id, engine.pad_token_id, 4)}


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        (dict(input_ids=[], max_new_tokens=1), "input_ids is empty"),
        (dict(input_ids=[1], max_new_tokens=-1), "max_new_tokens"),
        (dict(input_ids=[1], max_new_tokens=1, temperature=-0.5), "temperature"),
        (dict(input_ids=[1], max_new_tokens=1, top_p=0.0), "top_p"),
    ],
)
def test_bad_requests_are_rejected(tokenizer, request_kwargs, message):
    engine = HFEngine(ScriptedLM([1], len(tokenizer)), tokenizer)
    with pytest.raises(ValueError, match=message):
        engine.generate_sync([GenerationRequest(**request_kwargs)])


def test_hf_engine_satisfies_protocol_and_loads_from_disk(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = HFEngine.from_pretrained(tmp_path, seed=0)
    assert isinstance(engine, Engine)
    engine.eos_token_ids = set()
    prompt = tokenizer.encode(PROMPTS[0])
    out = asyncio.run(engine.generate([GenerationRequest(prompt, 3, temperature=0)]))[0]
    assert out.token_ids == reference_greedy(model, prompt, 3)[0]


# ----------------------------------------------------------------------------------------------
# SGLangEngine
# ----------------------------------------------------------------------------------------------


def make_sglang_app(behaviour: dict) -> FastAPI:
    """A scripted stand-in of SGLang's /generate: echoes a canned reply, records payloads."""
    app = FastAPI()
    state = {"in_flight": 0, "max_in_flight": 0, "calls": 0}
    behaviour.setdefault("payloads", [])
    behaviour["state"] = state

    @app.post("/generate")
    async def generate(request: Request):
        payload = await request.json()
        behaviour["payloads"].append(payload)
        state["calls"] += 1
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            await asyncio.sleep(behaviour.get("delay_s", 0.0))
            fail = behaviour.get("fail_first", [])
            if fail:
                status = fail.pop(0)
                return JSONResponse({"error": f"scripted {status}"}, status_code=status)
            n = len(payload["input_ids"])
            return {
                "text": f"echo {n}</search>",
                "meta_info": {
                    "finish_reason": {"type": "stop", "matched": "</search>"},
                    "output_token_logprobs": [[-0.5, n, None], [-0.25, n + 1, None]],
                },
            }
        finally:
            state["in_flight"] -= 1

    return app


def sglang_generate(url: str, requests: list[GenerationRequest], **engine_kw) -> list[GenerationOutput]:
    """``requests`` through a fresh SGLangEngine(url, **engine_kw), closed afterwards."""

    async def main():
        engine = SGLangEngine(url, **{"skip_special_tokens": False, **engine_kw})
        try:
            return await engine.generate(requests)
        finally:
            await engine.aclose()

    return asyncio.run(main())


def test_sglang_engine_payload_and_parsing():
    behaviour: dict = {}
    with serve_app(make_sglang_app(behaviour)) as url:
        (out,) = sglang_generate(
            url, [GenerationRequest([1, 2, 3], 16, temperature=0.5, top_p=0.9, top_k=20, stop=["</search>"])]
        )
    assert out.token_ids == [3, 4]
    assert out.logprobs == [-0.5, -0.25]
    assert out.text == "echo 3</search>"
    assert out.finish_reason == "stop"
    assert out.meta_info["finish_reason"]["matched"] == "</search>"
    (payload,) = behaviour["payloads"]
    assert payload == {
        "input_ids": [1, 2, 3],
        "sampling_params": {
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 20,
            "max_new_tokens": 16,
            "stop": ["</search>"],
            "stop_token_ids": None,
            "skip_special_tokens": False,
            "no_stop_trim": True,
            "spaces_between_special_tokens": False,
        },
        "return_logprob": True,
    }


def test_sglang_engine_bounds_concurrency_and_keeps_order():
    behaviour: dict = {"delay_s": 0.05}
    with serve_app(make_sglang_app(behaviour)) as url:
        outs = sglang_generate(url, [GenerationRequest([0] * (i + 1), 4) for i in range(10)], concurrency=3)
    assert [o.token_ids[0] for o in outs] == list(range(1, 11))
    assert 1 <= behaviour["state"]["max_in_flight"] <= 3


def test_sglang_engine_retries_5xx_but_not_4xx():
    behaviour: dict = {"fail_first": [503]}
    with serve_app(make_sglang_app(behaviour)) as url:
        assert sglang_generate(url, [GenerationRequest([1], 4)], backoff_s=0.01)[0].token_ids == [1, 2]
        assert behaviour["state"]["calls"] == 2

        behaviour["fail_first"] = [400]
        with pytest.raises(EngineError, match="HTTP 400.*scripted 400"):
            sglang_generate(url, [GenerationRequest([1], 4)], backoff_s=0.01)
        assert behaviour["state"]["calls"] == 3


def test_sglang_engine_raises_when_server_is_down():
    with pytest.raises(EngineError, match="failed after 2 attempts"):
        sglang_generate(f"http://127.0.0.1:{free_port()}", [GenerationRequest([1], 4)], max_retries=1, backoff_s=0.01)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"text": "x"}, "no meta_info"),
        ({"text": "x", "meta_info": {"finish_reason": {"type": "weird"}}}, "unknown finish_reason"),
        ({"text": "x", "meta_info": {"finish_reason": {"type": "stop"}}}, "lacks meta_info.output_token_logprobs"),
        ({"meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": []}}, "no text"),
        (
            {"text": "x", "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[None, 3]]}},
            "null logprob",
        ),
    ],
)
def test_malformed_sglang_replies_raise(reply, message):
    with pytest.raises(EngineError, match=message):
        parse_sglang_output(reply)


def test_abort_reply_without_logprobs_is_accepted():
    out = parse_sglang_output({"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "x"}}})
    assert out == GenerationOutput([], [], "", "abort", meta_info=out.meta_info)


def test_generation_does_not_change_the_models_training_mode(model, tokenizer):
    # The GRPO trainer generates with the policy it trains.
    model.train()
    try:
        engine = HFEngine(model, tokenizer, seed=0)
        engine.generate_sync([GenerationRequest(tokenizer.encode("who"), 2)])
        assert model.training
    finally:
        model.eval()
