"""Exact-match reward: the Search-R1 verdict on chat-templated prompt + response, quirks included."""

from __future__ import annotations

import numpy as np
import pytest

from searchr1.prompt import make_prompt
from searchr1.reward import (
    em_check,
    em_score,
    em_score_response_only,
    extract_answer,
    extract_answer_from_response,
    is_valid_sequence,
    normalize_answer,
)


def qwen_chat(user_content: str) -> str:
    """What slime's --apply-chat-template produces for a Qwen2.5 tokenizer."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user_content}<|im_end|>\n<|im_start|>assistant\n"
    )


PROMPT = qwen_chat(make_prompt("who wrote the hobbit"))

GOOD_SEARCH = (
    "<think> I need to look this up. </think>\n<search> the hobbit author </search>\n\n"
    '<information>Doc 1(Title: "The Hobbit") written by J. R. R. Tolkien</information>\n\n'
    "<think> It is Tolkien. </think>\n<answer> J. R. R. Tolkien </answer>"
)

# (response, golden answers, expected EM on prompt + response)
EM_CASES = [
    pytest.param("<think>x</think><answer>Tolkien</answer>", ["Tolkien"], 1.0, id="simple"),
    pytest.param(GOOD_SEARCH, ["J. R. R. Tolkien"], 1.0, id="after-search"),
    pytest.param(GOOD_SEARCH, ["J R R Tolkien"], 1.0, id="punctuation-in-golden"),
    pytest.param("<answer>tolkien</answer>", ["TOLKIEN"], 1.0, id="case"),
    pytest.param("<answer>  Tolkien \n</answer>", ["Tolkien"], 1.0, id="surrounding-whitespace"),
    pytest.param("<answer>J.R.R.   Tolkien</answer>", ["jrr tolkien"], 1.0, id="collapse-whitespace-punct"),
    pytest.param("<answer>The Hobbit</answer>", ["Hobbit"], 1.0, id="article-the"),
    pytest.param("<answer>an apple</answer>", ["Apple"], 1.0, id="article-an"),
    pytest.param("<answer>a b c</answer>", ["b c"], 1.0, id="article-a"),
    pytest.param("<answer>Theodore</answer>", ["odore"], 0.0, id="article-inside-word-kept"),
    pytest.param("<answer>Tolkien!</answer>", ["Tolkien"], 1.0, id="trailing-punct"),
    pytest.param("<answer>Tolkien</answer>", "Tolkien", 1.0, id="golden-str"),
    pytest.param("<answer>Tolkien</answer>", ["Lewis", "Tolkien"], 1.0, id="golden-list-second"),
    pytest.param("<answer>Tolkien</answer>", ["Lewis"], 0.0, id="wrong"),
    pytest.param("<answer>Tolkien wrote it</answer>", ["Tolkien"], 0.0, id="no-substring-credit"),
    pytest.param("<answer>Lewis</answer> <answer>Tolkien</answer>", ["Tolkien"], 1.0, id="last-wins"),
    pytest.param("<answer>Tolkien</answer> <answer>Lewis</answer>", ["Tolkien"], 0.0, id="last-wins-wrong"),
    pytest.param("<answer>J. R. R.\nTolkien</answer>", ["J R R Tolkien"], 1.0, id="multi-line"),
    pytest.param("<answer>Zürich</answer>", ["zürich"], 1.0, id="unicode-case"),
    pytest.param("<answer>São Paulo</answer>", ["Sao Paulo"], 0.0, id="unicode-accents-kept"),
    pytest.param("<answer>“Tolkien”</answer>", ["Tolkien"], 0.0, id="unicode-quotes-not-punct"),
    pytest.param("<answer>1,000</answer>", ["1000"], 1.0, id="digits-comma"),
    pytest.param("<answer></answer>", [""], 1.0, id="empty-answer-empty-golden"),
    pytest.param("<answer></answer>", ["Tolkien"], 0.0, id="empty-answer"),
    # The prompt's own examples: no answer in the response -> "Beijing".
    pytest.param("<think>no idea</think>", ["Beijing"], 1.0, id="no-answer-scored-as-beijing"),
    pytest.param("<think>no idea</think>", ["Tolkien"], 0.0, id="no-answer"),
    pytest.param("", ["beijing"], 1.0, id="empty-response-beijing"),
    # Echoing the instruction gives the stray "and".
    pytest.param("inside <answer> and </answer>", ["and"], 1.0, id="echo-and"),
    pytest.param("<answer>Tolkien", ["Tolkien"], 0.0, id="unclosed-answer-falls-back-to-beijing"),
    pytest.param("<answer>Tolkien</answer> trailing junk", ["Tolkien"], 1.0, id="format-invalid-still-em"),
]


@pytest.mark.parametrize(("response", "golden", "expected"), EM_CASES)
def test_em_score_on_prompt_plus_response(response, golden, expected):
    assert em_score(PROMPT + response, golden) == expected


def test_prompt_alone_holds_two_answer_examples():
    assert extract_answer(PROMPT) == "Beijing"
    assert extract_answer_from_response("") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no tags", None),
        ("<answer>one</answer>", None),  # a single match is not enough
        ("<answer>one</answer><answer> two </answer>", "two"),
        ("<answer>a\nb</answer>x<answer>\nc\n</answer>", "c"),
        ("<answer><answer>x</answer></answer><answer>y</answer>", "y"),
    ],
)
def test_extract_answer_rules(text, expected):
    assert extract_answer(text) == expected


def test_golden_answers_as_numpy_array():
    # Parquet rows carry ground_truth.target as a numpy array of strings.
    assert em_score(PROMPT + "<answer>Tolkien</answer>", np.array(["Lewis", "Tolkien"], dtype=object)) == 1.0


def test_non_string_golden_answer_is_rejected():
    with pytest.raises(TypeError, match="golden answers must be strings"):
        em_check("x", [1, 2])


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The  Quick, Brown fox!", "quick brown fox"),
        ("a", ""),
        ("An Apple a day", "apple day"),
        ("  \tHello\nWorld  ", "hello world"),
        ("U.S.A.", "usa"),
        ("ÉCOLE", "école"),
        ("rock'n'roll", "rocknroll"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_response_only_diagnostic_ignores_prompt_examples():
    response = "<think>no idea</think>"
    assert em_score(PROMPT + response, ["Beijing"]) == 1.0
    assert em_score_response_only(response, ["Beijing"]) == 0.0
    assert em_score_response_only("<answer>Lewis</answer><answer>Tolkien</answer>", ["tolkien"]) == 1.0
    assert em_score_response_only("<answer>Tolkien</answer>", ["Lewis"]) == 0.0


@pytest.mark.parametrize(
    ("response", "valid", "reason_part"),
    [
        (GOOD_SEARCH, True, "Valid"),
        ("<think>x</think><answer>y</answer>", True, "Valid"),
        (
            "<think>a</think><search>q</search><information>i</information>"
            "<think>b</think><search>q2</search><information>j</information><think>c</think><answer>y</answer>",
            True,
            "Valid",
        ),
        ("<answer>y</answer>", False, "Unexpected tag <answer> in state start"),
        ("<think>x</think><answer>y</answer> junk", False, "Unexpected content"),
        ("<think>x</think>", False, "Incomplete sequence"),
        ("<think>x</think><search>q</search>", False, "Incomplete sequence, ended in state after_search"),
        ("<think>x<answer>y</answer>", False, "Mismatch in think tags"),
        ("hello <think>x</think><answer>y</answer>", False, "Unexpected content 'hello'"),
    ],
)
def test_is_valid_sequence(response, valid, reason_part):
    ok, reason = is_valid_sequence(PROMPT + response)
    assert ok is valid
    assert reason_part in reason


def test_is_valid_sequence_needs_assistant_marker():
    assert is_valid_sequence("<think>x</think><answer>y</answer>") == (False, "Missing assistant marker")


# --- Search-R1's format-aware reward (compute_score_em, qa_em_format.py at a14dc3a) ----------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from searchr1.reward import (  # noqa: E402
    RewardConfigError,
    RewardSettings,
    compute_score_em,
    is_retrieval_correct,
)

BARE = "<|im_start|>assistant\n"  # the marker without the Search-R1 instruction: its two <answer> examples absent
INFO_HIT = "<information>Doc 1(Title: The Hobbit) written by J. R. R. Tolkien</information>"
INFO_MISS = "<information>Doc 1(Title: Narnia) written by C. S. Lewis</information>"


def searched(info: str, answer: str | None) -> str:
    text = f"<think> a </think>\n<search> q </search>\n\n{info}\n\n<think> b </think>\n"
    return text + (f"<answer> {answer} </answer>" if answer is not None else "")


# (prompt, response, expected) with structure 0.2, final 0.1, retrieval 0.15, score 1.0 (values told apart)
SHAPED_CASES = [
    pytest.param(PROMPT, "<think> x </think>\n<answer> Tolkien </answer>", 1.0, id="em-valid"),
    pytest.param(PROMPT, searched(INFO_HIT, "Tolkien"), 1.0, id="em-valid-after-search"),
    pytest.param(PROMPT, "<answer> Tolkien </answer>", 1.0 - 0.2, id="em-invalid-no-think"),
    pytest.param(PROMPT, "<think> x <answer> Tolkien </answer>", 1.0 - 0.2, id="em-invalid-unclosed-think"),
    pytest.param(PROMPT, "<think> x </think>\n<answer> Tolkien </answer> and more", 1.0 - 0.2, id="em-invalid-tail"),
    pytest.param(PROMPT, searched(INFO_HIT, "Lewis"), 0.2 + 0.15, id="wrong-valid-retrieval-hit"),
    pytest.param(PROMPT, searched(INFO_MISS, "Lewis"), 0.2, id="wrong-valid-retrieval-miss"),
    pytest.param(PROMPT, "<think> x </think>\n<answer> Lewis </answer>", 0.2, id="wrong-valid-no-search"),
    pytest.param(PROMPT, "<answer> Lewis </answer>", 0.1, id="wrong-invalid"),
    pytest.param(PROMPT, searched(INFO_HIT, "Lewis") + " junk", 0.1, id="wrong-invalid-hit-not-counted"),
    # the prompt's own examples: no answer in the response is the answer "Beijing", wrong and invalid
    pytest.param(PROMPT, "<think> no idea </think>", 0.1, id="prompt-example-beijing-invalid"),
    # fewer than two <answer> in the whole text (no instruction in the prompt): no answer
    pytest.param(BARE, searched(INFO_HIT, "Lewis"), 0.2 + 0.15, id="none-valid-retrieval-hit"),
    pytest.param(BARE, searched(INFO_MISS, "Tolkien"), 0.2, id="none-valid-retrieval-miss"),
    pytest.param(BARE, "<think> x </think>", 0.0, id="none-invalid"),
    pytest.param("", "<think> x </think>\n<answer> Tolkien </answer>", 0.0, id="none-no-marker"),
    # no assistant marker: never valid (the prompt check refuses this configuration before training)
    pytest.param("User: q\nAssistant:", "<think> x </think>\n<answer> Tolkien </answer>", 0.0, id="no-marker-one"),
]


@pytest.mark.parametrize(("prompt", "response", "expected"), SHAPED_CASES)
def test_compute_score_em_branch_by_branch(prompt, response, expected):
    got = compute_score_em(
        prompt + response,
        {"target": ["J. R. R. Tolkien", "Tolkien"]},
        structure_format_score=0.2,
        final_format_score=0.1,
        retrieval_score=0.15,
    )
    assert got == expected  # exact: the same arithmetic as upstream (1.0 - 0.2, 0.2 + 0.15)
    settings_score = RewardSettings(0.2, 0.1, 0.15).score(prompt + response, ["J. R. R. Tolkien", "Tolkien"])
    assert settings_score == expected


def test_compute_score_em_score_argument_and_defaults():
    text = PROMPT + "<answer> Tolkien </answer>"
    assert compute_score_em(text, {"target": ["Tolkien"]}, structure_format_score=0.2, score=2.0) == 2.0 - 0.2
    assert compute_score_em(text, {"target": ["Tolkien"]}) == 1.0  # Search-R1's defaults: plain EM
    assert compute_score_em(PROMPT + "<answer> x </answer>", {"target": ["Tolkien"]}) == 0.0


def test_compute_score_em_names_a_malformed_ground_truth():
    with pytest.raises(ValueError, match="ground_truth must be"):
        compute_score_em(PROMPT, ["Tolkien"])
    with pytest.raises(ValueError, match="ground_truth must be"):
        compute_score_em(PROMPT, {"answers": ["Tolkien"]})


def test_compute_score_em_takes_no_ignored_format_score():
    """Upstream accepts and ignores format_score (slime's example passes 0.2 and trains on EM): refused here."""
    with pytest.raises(TypeError, match="format_score"):
        compute_score_em(PROMPT, {"target": ["x"]}, format_score=0.2)


def test_is_retrieval_correct_is_upstreams_plain_substring_test():
    assert is_retrieval_correct(PROMPT + INFO_HIT, ["Tolkien"])
    assert not is_retrieval_correct(PROMPT + INFO_MISS, ["Tolkien"])
    assert is_retrieval_correct(PROMPT + INFO_MISS, ["1"])  # "Doc 1"
    assert is_retrieval_correct(PROMPT + INFO_MISS, ["The"])  # normalises to "": in every block
    # the Search-R1 instruction's own "between <information> and </information>" is a block
    assert is_retrieval_correct(PROMPT, ["and"]) and not is_retrieval_correct(BARE, ["and"])
    assert is_retrieval_correct(BARE + "<information>\nJ.R.R. TOLKIEN!\n</information>", ["jrr tolkien"])


FRAGMENTS = [
    "<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>",
    " ", "\n", "Tolkien", "J. R. R. Tolkien", "Lewis", "the", "and", "Beijing", "Doc 1", "x", "<|im_start|>assistant\n",
]  # fmt: skip
texts = st.tuples(
    st.sampled_from([PROMPT, BARE, "", "User: q\nAssistant:"]),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=16).map("".join),
).map("".join)
goldens = st.lists(
    st.sampled_from(["Tolkien", "J. R. R. Tolkien", "Beijing", "and", "the", "1"]) | st.text(), min_size=1
)


@settings(max_examples=400, deadline=None)
@given(text=texts, golden=goldens)
def test_all_scores_zero_is_exactly_todays_em(text, golden):
    assert compute_score_em(text, {"target": golden}) == em_score(text, golden)
    assert RewardSettings(0.0, 0.0, 0.0).score(text, golden) == em_score(text, golden)


@settings(max_examples=400, deadline=None)
@given(text=texts, golden=goldens)
def test_shaped_reward_takes_only_the_tables_values(text, golden):
    s, f, r = 0.2, 0.1, 0.15
    got = compute_score_em(text, {"target": golden}, structure_format_score=s, final_format_score=f, retrieval_score=r)
    valid = is_valid_sequence(text)[0]
    if em_score(text, golden) == 1.0:
        assert got == (1.0 if valid else 1.0 - s)
    elif valid:
        assert got == (s + r if is_retrieval_correct(text, golden) else s)
    else:
        assert got == (f if extract_answer(text) is not None else 0.0)


CASES_FILE = Path(__file__).parent / "fixtures" / "search_r1_reward_cases.json"


def test_agrees_with_search_r1s_own_function_on_the_pinned_cases():
    """tests/fixtures/search_r1_reward_cases.json: Search-R1's compute_score_em (a14dc3a), run once on 416 texts x 4
    score settings by tests/fixtures/make_search_r1_reward_cases.py; ours must give the same value, bit for bit."""
    table = json.loads(CASES_FILE.read_text(encoding="utf-8"))
    assert table["source"].startswith("PeterGriffinJin/Search-R1@a14dc3a") and len(table["cases"]) >= 400
    branches = set()
    for case in table["cases"]:
        text = table["prompts"][case["prompt"]] + case["response"]
        for (s, f, r), expected in zip(table["scores"], case["expected"], strict=True):
            got = compute_score_em(
                text, {"target": case["target"]}, structure_format_score=s, final_format_score=f, retrieval_score=r
            )
            assert got == expected, (case, (s, f, r))
        valid = is_valid_sequence(text)[0]
        answer = extract_answer(text)
        branches.add(
            (
                valid,
                "none" if answer is None else ("em" if em_score(text, case["target"]) else "wrong"),
                valid and is_retrieval_correct(text, case["target"]),
            )
        )
    # every branch of the table is among the pinned cases
    assert branches >= {
        (True, "em", True),
        (True, "em", False),
        (False, "em", False),
        (True, "wrong", True),
        (True, "wrong", False),
        (False, "wrong", False),
        (True, "none", True),
        (True, "none", False),
        (False, "none", False),
    }, branches


# --- the prompt check: a format score needs the assistant marker --------------------------------------------


def test_check_prompt_accepts_chatml_and_templates_that_open_a_think_block():
    shaped = RewardSettings(0.2, 0.1, 0.0)
    shaped.check_prompt(PROMPT)
    shaped.check_prompt(PROMPT + "<think>\n")
    shaped.check_prompt(PROMPT + "<think>\n\n</think>\n\n")  # Qwen3's non-thinking generation prompt


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("User: who wrote the hobbit?\nAssistant:", r"no '<\|im_start\|>assistant' marker"),
        (PROMPT + "Sure! ", r"text after its first '<\|im_start\|>assistant' marker is not a response"),
        (BARE + "an example turn<|im_end|>\n" + PROMPT, "not a response"),
    ],
)
def test_check_prompt_refuses_a_format_score_no_response_can_earn(prompt, message):
    with pytest.raises(RewardConfigError, match=message) as err:
        RewardSettings(0.0, 0.1, 0.0).check_prompt(prompt)
    assert "reward.final_format_score = 0.1" in str(err.value) and "every sequence" in str(err.value)
    RewardSettings(0.0, 0.0, 0.0).check_prompt(prompt)  # exact match: any prompt


def test_reward_settings_from_config():
    from helpers import config

    assert RewardSettings.from_config(config()) == RewardSettings(0.0, 0.0, 0.0)
    assert RewardSettings.from_config(config()).is_exact_match
    shaped = RewardSettings.from_config(config(reward={"structure_format_score": 0.2, "final_format_score": 0.1}))
    assert shaped == RewardSettings(0.2, 0.1, 0.0) and not shaped.is_exact_match
