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
