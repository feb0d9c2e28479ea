"""The agent loop with a scripted engine (each prompt's turns in order), a fake retriever and a real (small,
trained) byte-level BPE tokenizer."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import FakeRetriever, ScriptedEngine, agent_config, bpe_tokenizer

from searchr1.agent import (
    INVALID_ACTION_TEXT,
    STOP_STRINGS,
    golden_in_retrieved,
    observation_text,
    parse_action,
    render_docs,
    run_agent,
)
from searchr1.engines import GenerationOutput
from searchr1.prompt import make_prompt
from searchr1.retrieval.client import RetrievalError
from searchr1.reward import em_score

TOKENIZER = bpe_tokenizer()

HOBBIT = {"id": "7", "contents": '"The Hobbit"\nThe Hobbit is a novel by Tolkien.'}
LOTR = {"id": "9", "contents": '"The Lord of the Rings"\nAn epic by Tolkien.\nPublished 1954.'}


def chat(question: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{make_prompt(question)}<|im_end|>\n<|im_start|>assistant\n"
    )


def enc(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def run(engine, retriever, prompts, **cfg):
    return asyncio.run(run_agent(engine, retriever, TOKENIZER, prompts, agent_config(**{"temperature": 1.0, **cfg})))


Q1 = chat("who wrote the hobbit")
Q2 = chat("when was the lord of the rings published")

THINK_SEARCH = "<think> I need to search. </think>\n<search> hobbit author </search>"
THINK_ANSWER = "<think> It was Tolkien. </think>\n<answer> Tolkien </answer>"


def check_invariants(traj):
    assert len(traj.response_ids) == len(traj.loss_mask) == len(traj.logprobs)
    assert traj.full_text == traj.prompt_text + traj.response_text
    assert traj.prompt_ids == enc(traj.prompt_text)
    assert traj.response_text == "".join(s.text for s in traj.segments)
    assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.loss_mask, strict=True) if m == 0)


def test_texts_match_the_reference():
    assert STOP_STRINGS == ("</search>", "</answer>")
    assert INVALID_ACTION_TEXT == (
        "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
        "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
        "Let me try again.\n"
    )
    assert render_docs([HOBBIT, LOTR]) == (
        'Doc 1(Title: "The Hobbit") The Hobbit is a novel by Tolkien.\n'
        'Doc 2(Title: "The Lord of the Rings") An epic by Tolkien.\nPublished 1954.\n'
    )
    assert observation_text([HOBBIT]) == (
        '\n\n<information>Doc 1(Title: "The Hobbit") The Hobbit is a novel by Tolkien.</information>\n\n'
    )
    assert observation_text([{"id": "1", "contents": "no newline"}]) == (
        "\n\n<information>Doc 1(Title: no newline)</information>\n\n"  # strip() eats the space
    )
    assert observation_text([]) == "\n\n<information></information>\n\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<search> a b </search>", ("search", "a b")),
        ("x <answer>\n42\n</answer> <search>q</search>", ("answer", "42")),
        ("<search>q</answer>", (None, "")),
        ("<think>only thinking</think>", (None, "")),
        ("<search>first</search><search>second</search>", ("search", "first")),
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_answer_at_once():
    engine = ScriptedEngine(TOKENIZER, {Q1: [(THINK_ANSWER, "stop")]})
    retriever = FakeRetriever()
    (traj,) = run(engine, retriever, [Q1])
    check_invariants(traj)
    assert traj.response_text == THINK_ANSWER
    assert traj.response_ids == enc(THINK_ANSWER)
    assert traj.loss_mask == [1] * len(traj.response_ids)
    assert traj.logprobs == engine.logprobs_for(enc(THINK_ANSWER), 0)
    assert (traj.status, traj.num_turns, traj.num_searches, traj.answered) == ("completed", 1, 0, True)
    assert traj.extracted_answer == "Tolkien"
    assert traj.format_valid
    assert not traj.answer_in_retrieved
    assert retriever.calls == []
    (request,) = engine.calls[0]
    assert request.stop == ["</search>", "</answer>"]
    assert (request.max_new_tokens, request.temperature, request.top_p, request.top_k) == (512, 1.0, 1.0, -1)
    assert em_score(traj.full_text, ["Tolkien"]) == 1.0


def test_search_then_answer():
    engine = ScriptedEngine(TOKENIZER, {Q1: [(THINK_SEARCH, "stop"), (THINK_ANSWER, "stop")]})
    retriever = FakeRetriever({"hobbit author": [HOBBIT, LOTR, HOBBIT, LOTR]})
    (traj,) = run(engine, retriever, [Q1], max_new_tokens=64, temperature=0.5)
    check_invariants(traj)
    obs = observation_text([HOBBIT, LOTR, HOBBIT])
    assert traj.response_text == THINK_SEARCH + obs + THINK_ANSWER
    assert traj.response_ids == enc(THINK_SEARCH) + enc(obs) + enc(THINK_ANSWER)
    n1, n_obs = len(enc(THINK_SEARCH)), len(enc(obs))
    assert traj.loss_mask == [1] * n1 + [0] * n_obs + [1] * len(enc(THINK_ANSWER))
    assert traj.logprobs[n1 : n1 + n_obs] == [0.0] * n_obs
    assert traj.logprobs[n1 + n_obs :] == engine.logprobs_for(enc(THINK_ANSWER), 1)
    assert traj.n_model_tokens == n1 + len(enc(THINK_ANSWER))
    assert retriever.calls == [(["hobbit author"], 3)]
    # The second turn continues from exactly the trained tokens.
    second = engine.calls[1][0]
    assert second.input_ids == traj.prompt_ids + enc(THINK_SEARCH) + enc(obs)
    assert (second.max_new_tokens, second.temperature) == (64, 0.5)
    assert [s.kind for s in traj.segments] == ["model", "observation", "model"]
    assert (traj.num_searches, traj.queries, traj.num_turns, traj.status) == (1, ["hobbit author"], 2, "completed")
    assert traj.retrieved == [[HOBBIT, LOTR, HOBBIT]]
    assert traj.answered and traj.extracted_answer == "Tolkien"
    assert traj.format_valid
    assert traj.answer_in_retrieved
    assert golden_in_retrieved(traj, ["J. Tolkien", "tolkien"])
    assert not golden_in_retrieved(traj, ["Lewis", ""])


def test_invalid_action_gets_the_reminder():
    engine = ScriptedEngine(TOKENIZER, {Q1: [("I think it is Tolkien.", "stop"), (THINK_ANSWER, "stop")]})
    (traj,) = run(engine, FakeRetriever(), [Q1])
    check_invariants(traj)
    assert traj.response_text == "I think it is Tolkien." + INVALID_ACTION_TEXT + THINK_ANSWER
    n1, n_inv = len(enc("I think it is Tolkien.")), len(enc(INVALID_ACTION_TEXT))
    assert traj.loss_mask[n1 : n1 + n_inv] == [0] * n_inv
    assert traj.loss_mask[:n1] == [1] * n1
    assert [s.kind for s in traj.segments] == ["model", "invalid", "model"]
    assert (traj.num_searches, traj.status) == (0, "completed")
    assert not traj.format_valid


def test_search_in_the_last_turn_is_observed_but_not_followed():
    second_search = "<think> More. </think>\n<search> lotr year </search>"
    engine = ScriptedEngine(TOKENIZER, {Q1: [(THINK_SEARCH, "stop"), (second_search, "stop"), (THINK_ANSWER, "stop")]})
    retriever = FakeRetriever({"hobbit author": [HOBBIT], "lotr year": [LOTR]})
    (traj,) = run(engine, retriever, [Q1])
    check_invariants(traj)
    assert len(engine.calls) == 2
    assert traj.response_text.endswith(second_search + observation_text([LOTR]))
    assert (traj.num_searches, traj.num_turns, traj.status, traj.answered) == (2, 2, "completed", False)
    assert traj.extracted_answer is None
    assert traj.loss_mask[-1] == 0
    # The prompt's own examples decide the EM: "Beijing" (the Search-R1 quirk).
    assert em_score(traj.full_text, ["Beijing"]) == 1.0


def test_max_turns_one():
    engine = ScriptedEngine(TOKENIZER, {Q1: [(THINK_SEARCH, "stop")]})
    retriever = FakeRetriever({"hobbit author": [HOBBIT]})
    (traj,) = run(engine, retriever, [Q1], max_turns=1)
    assert len(engine.calls) == 1
    assert traj.response_text == THINK_SEARCH + observation_text([HOBBIT])


def test_length_stops_the_loop_as_truncated():
    engine = ScriptedEngine(TOKENIZER, {Q1: [("<think> long <search> x </search> thinking", "length")]})
    retriever = FakeRetriever({"x": [HOBBIT]})
    (traj,) = run(engine, retriever, [Q1])
    check_invariants(traj)
    assert traj.status == "truncated"
    assert retriever.calls == []
    assert traj.loss_mask == [1] * len(traj.response_ids)
    assert len(engine.calls) == 1


def test_abort_drops_the_turn_and_ends():
    engine = ScriptedEngine(TOKENIZER, {Q1: [(THINK_SEARCH, "stop"), ("", "abort")]})
    (traj,) = run(engine, FakeRetriever({"hobbit author": [HOBBIT]}), [Q1])
    check_invariants(traj)
    assert traj.status == "aborted"
    assert traj.response_text == THINK_SEARCH + observation_text([HOBBIT])
    assert traj.num_turns == 2


def test_retrieval_failure_fail_mode_raises_with_cause():
    cause = RetrievalError("retriever down")
    engine = ScriptedEngine(TOKENIZER, {Q1: [(THINK_SEARCH, "stop"), (THINK_ANSWER, "stop")]})
    with pytest.raises(RetrievalError, match="retrieval failed for 1 queries in turn 0: retriever down") as info:
        run(engine, FakeRetriever(error=cause), [Q1])
    assert info.value.__cause__ is cause


def test_retrieval_failure_degrade_mode_inserts_empty_information(caplog):
    engine = ScriptedEngine(TOKENIZER, {Q1: [(THINK_SEARCH, "stop"), (THINK_ANSWER, "stop")]})
    with caplog.at_level(logging.WARNING, logger="searchr1.agent"):
        (traj,) = run(engine, FakeRetriever(error=RetrievalError("down")), [Q1], on_retrieval_error="degrade")
    check_invariants(traj)
    assert traj.response_text == THINK_SEARCH + "\n\n<information></information>\n\n" + THINK_ANSWER
    assert (traj.retrieval_failures, traj.num_searches, traj.status) == (1, 1, "completed")
    assert traj.retrieved == [[]]
    assert "degrade" in caplog.text and "down" in caplog.text


def test_empty_query_is_not_sent():
    engine = ScriptedEngine(
        TOKENIZER, {Q1: [("<think> hm </think><search>  </search>", "stop"), (THINK_ANSWER, "stop")]}
    )
    retriever = FakeRetriever()
    (traj,) = run(engine, retriever, [Q1])
    assert retriever.calls == []
    assert traj.queries == [""] and traj.num_searches == 1 and traj.retrieval_failures == 0
    assert "<information></information>" in traj.response_text


def test_batch_is_turn_synchronous_with_one_retriever_call_per_turn():
    q3 = chat("who is frodo")
    engine = ScriptedEngine(
        TOKENIZER,
        {
            Q1: [(THINK_SEARCH, "stop"), (THINK_ANSWER, "stop")],
            Q2: [(THINK_ANSWER.replace("Tolkien", "1954"), "stop")],
            q3: [("<search> lotr </search>", "stop"), ("<answer> a hobbit </answer>", "stop")],
        },
    )
    retriever = FakeRetriever({"hobbit author": [HOBBIT], "lotr": [LOTR]})
    t1, t2, t3 = run(engine, retriever, [Q1, Q2, q3], topk=1)
    for t in (t1, t2, t3):
        check_invariants(t)
    assert [len(call) for call in engine.calls] == [3, 2]
    assert retriever.calls == [(["hobbit author", "lotr"], 1)]
    assert t2.num_turns == 1 and t2.extracted_answer == "1954"
    assert t3.extracted_answer == "a hobbit" and t3.retrieved == [[LOTR]]
    assert not t3.format_valid  # no <think> first


def test_config_is_validated():
    with pytest.raises(ValueError, match="on_retrieval_error"):
        agent_config(on_retrieval_error="ignore")
    with pytest.raises(ValueError, match="max_turns"):
        agent_config(max_turns=0)


def test_engine_output_mismatch_is_an_error():
    class BadEngine:
        async def generate(self, requests):
            return [GenerationOutput([1, 2], [0.0], "x", "stop") for _ in requests]

    with pytest.raises(ValueError, match="2 token ids but 1 logprobs"):
        run(BadEngine(), FakeRetriever(), [Q1])
