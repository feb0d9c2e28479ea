"""The Search-R1 exact-match reward, reproducing the verdict of slime's ``compute_score_em`` exactly.

slime scores ``sample.prompt + sample.response`` (chat-templated prompt plus the whole response), and
the default format/retrieval scores are all 0, so the reward is plain 1/0 exact match. Two quirks are
kept on purpose because the published numbers were produced with them:

* the answer is the LAST ``<answer>...</answer>`` in the WHOLE text, and fewer than two matches mean
  "no answer". The Search-R1 prompt holds two matches itself (``<answer> and </answer>`` and
  ``<answer> Beijing </answer>``), so a response without any answer is scored as "Beijing", and one
  that echoes the instruction as "and";
* the format check (``is_valid_sequence``) does not change the reward with the default scores.

``em_score_response_only`` is a stricter diagnostic (answer taken from the response alone); it is
never the training reward.

``compute_score_em`` is Search-R1's format-aware reward (``verl/utils/reward_score/qa_em_format.py`` at
PeterGriffinJin/Search-R1 a14dc3a): with its three scores 0 (the config's ``reward:`` defaults, the seed recipe)
it equals ``em_score``. ``RewardSettings`` holds the three scores of the ``reward:`` config section; both training
backends score rollouts with ``RewardSettings.score`` and evaluation always with ``em_score``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFORMATION_RE = re.compile(r"<information>(.*?)</information>", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

# is_valid_sequence: the assistant turn starts after this marker (Qwen chat template).
_ASSISTANT_RE = re.compile(r"<\|im_start\|>assistant\s*")
_FORMAT_TAGS = ("think", "search", "information", "answer")
_TAG_SPLIT_RE = re.compile(r"(</?(?:think|search|information|answer)>)")
_TAG_RE = re.compile(r"</?(?:think|search|information|answer)>")

# (state, tag) -> next state: think -> (search -> information -> think)* -> answer.
_TRANSITIONS: dict[tuple[str, str], str] = {
    ("start", "<think>"): "in_think",
    ("information", "<think>"): "in_think",
    ("in_think", "</think>"): "after_think",
    ("after_think", "<search>"): "in_search",
    ("in_search", "</search>"): "after_search",
    ("after_search", "<information>"): "in_information",
    ("in_information", "</information>"): "information",
    ("after_think", "<answer>"): "in_answer",
    ("in_answer", "</answer>"): "end",
}
_INSIDE_TAG_STATES = frozenset({"in_think", "in_search", "in_information", "in_answer"})
_BETWEEN_TAG_STATES = frozenset({"start", "after_think", "after_search", "information"})


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, articles -> space, collapse whitespace."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _as_answer_list(golden_answers: str | Iterable[str]) -> list[str]:
    # Parquet gives numpy arrays; accept any iterable of strings, and a bare string as one answer.
    if isinstance(golden_answers, str):
        return [golden_answers]
    answers = list(golden_answers)
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"golden answers must be strings, got {type(answer).__name__}: {answer!r}")
    return answers


def em_check(prediction: str, golden_answers: str | Iterable[str]) -> bool:
    """True if the normalised prediction equals any normalised golden answer."""
    normalized_prediction = normalize_answer(prediction)
    return any(normalize_answer(g) == normalized_prediction for g in _as_answer_list(golden_answers))


def extract_answer(text: str) -> str | None:
    """Search-R1's extraction over the whole text: < 2 matches -> None, else the last one, stripped."""
    matches = _ANSWER_RE.findall(text)
    if len(matches) < 2:
        return None
    return matches[-1].strip()


def extract_answer_from_response(response: str) -> str | None:
    """The last ``<answer>`` of the response alone (>= 1 match); diagnostic, not the reward's rule."""
    matches = _ANSWER_RE.findall(response)
    if not matches:
        return None
    return matches[-1].strip()


def em_score(text: str, golden_answers: str | Iterable[str]) -> float:
    """The training/eval reward: ``compute_score_em`` with its default scores (1.0 on EM, else 0.0).

    ``text`` is the chat-templated prompt plus the response, as slime passes it.
    """
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    return 1.0 if em_check(answer, golden_answers) else 0.0


def em_score_response_only(response: str, golden_answers: str | Iterable[str]) -> float:
    """Stricter diagnostic EM: the answer must be in the response itself (no prompt examples)."""
    answer = extract_answer_from_response(response)
    if answer is None:
        return 0.0
    return 1.0 if em_check(answer, golden_answers) else 0.0


def is_valid_sequence(text: str) -> tuple[bool, str]:
    """Search-R1's format state machine over the text after ``<|im_start|>assistant``.

    Returns (valid, reason). Only whitespace may appear between tags; the sequence must end with
    ``</answer>``.
    """
    marker = _ASSISTANT_RE.search(text)
    if marker is None:
        return False, "Missing assistant marker"
    content = text[marker.end() :]

    for tag in _FORMAT_TAGS:
        n_open = len(re.findall(f"<{tag}>", content))
        n_close = len(re.findall(f"</{tag}>", content))
        if n_open != n_close:
            return False, f"Mismatch in {tag} tags: {n_open} opening vs {n_close} closing tags"

    state = "start"
    for part in _TAG_SPLIT_RE.split(content):
        if not part.strip():
            continue
        if _TAG_RE.match(part):
            next_state = _TRANSITIONS.get((state, part))
            if next_state is None:
                return False, f"Unexpected tag {part} in state {state}"
            state = next_state
        elif state in _INSIDE_TAG_STATES:
            continue
        elif state in _BETWEEN_TAG_STATES:
            return False, f"Unexpected content '{part.strip()}' between tags (state: {state})"
        else:
            return False, f"Unexpected content in state {state}"

    if state != "end":
        return False, f"Incomplete sequence, ended in state {state}"
    return True, "Valid sequence format"


# ----------------------------------------------------------------------------------------------
# Search-R1's format-aware reward (verl/utils/reward_score/qa_em_format.py, PeterGriffinJin/Search-R1 a14dc3a)
# ----------------------------------------------------------------------------------------------

# slime's reward dict keys (searchr1.slime_plugin.reward_func; --reward-key / --eval-reward-key): the training
# reward and the exact match evaluation reads.
TRAINING_REWARD_KEY = "score"
EM_REWARD_KEY = "em"

# Well-formed responses for RewardSettings.check_prompt: one of them is format-valid behind any prompt that
# ends with the assistant marker, or with an opened <think> or a closed think block (templates that add one).
_CANARY_RESPONSES = (
    "<think> x </think>\n<answer> x </answer>",
    " x </think>\n<answer> x </answer>",
    "<answer> x </answer>",
)


def extract_information_blocks(text: str) -> list[str]:
    """The stripped contents of every ``<information>...</information>`` in ``text`` (prompt included)."""
    return [block.strip() for block in _INFORMATION_RE.findall(text)]


def is_retrieval_correct(text: str, golden_answers: str | Iterable[str]) -> bool:
    """Search-R1's retrieval check: a normalised golden answer is a substring of a normalised ``<information>``
    block of the whole text. A plain substring test, as upstream: "1" is found in "Doc 1", and a golden answer
    that normalises to "" (e.g. "the") is found in any block; the prompt's own "between <information> and
    </information>" is a block (" and ") too."""
    answers = [normalize_answer(g) for g in _as_answer_list(golden_answers)]
    return any(answer in normalize_answer(block) for block in extract_information_blocks(text) for answer in answers)


def compute_score_em(
    solution_str: str,
    ground_truth: Mapping[str, Any],
    *,
    structure_format_score: float = 0,
    final_format_score: float = 0,
    retrieval_score: float = 0,
    score: float = 1.0,
) -> float:
    """Search-R1's ``compute_score_em`` (qa_em_format.py, a14dc3a) on ``solution_str`` = chat-templated prompt +
    response, with ``ground_truth = {"target": [golden answers]}``.

    The keyword defaults are Search-R1's own (its signature), not a second home of the config's ``reward:``
    values: the workflow always passes those (``RewardSettings.score``). Upstream also takes ``method`` and
    ``format_score`` and ignores both; they are not accepted here, so a caller that means a format score gets
    a TypeError instead of silent pure EM (slime's example passes ``format_score=0.2`` and trains on EM).

    ==============================  ==========================  ==================================
    answer (last of >= 2 matches)   format valid                format invalid
    ==============================  ==========================  ==================================
    exact match                     ``score``                   ``score - structure_format_score``
    wrong                           ``structure_format_score``  ``final_format_score``
                                    (``+ retrieval_score`` if
                                    a golden answer is in an
                                    ``<information>`` block)
    none (< 2 ``<answer>`` tags)    as "wrong"                  0
    ==============================  ==========================  ==================================
    """
    try:
        target = ground_truth["target"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"ground_truth must be {{'target': [golden answers]}}, got {str(ground_truth)[:200]}") from exc
    valid, _ = is_valid_sequence(solution_str)
    retrieval_correct = valid and is_retrieval_correct(solution_str, target)
    answer = extract_answer(solution_str)
    if answer is not None and em_check(answer, target):
        return score if valid else score - structure_format_score
    if valid:
        return structure_format_score + retrieval_score if retrieval_correct else structure_format_score
    return final_format_score if answer is not None else 0.0


class RewardConfigError(ValueError):
    """The reward settings cannot work with this prompt (the message says why and what to change)."""


@dataclass(frozen=True)
class RewardSettings:
    """The ``reward:`` config section: Search-R1's three scores of ``compute_score_em`` (all 0 = exact match)."""

    structure_format_score: float
    final_format_score: float
    retrieval_score: float

    CONFIG_KEYS: ClassVar[dict[str, str]] = {
        "structure_format_score": "reward.structure_format_score",
        "final_format_score": "reward.final_format_score",
        "retrieval_score": "reward.retrieval_score",
    }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RewardSettings:
        # searchr1.config imported here: the slime plugin imports this module inside slime's image
        from searchr1.config import settings_from_config

        return settings_from_config(cls, cfg)

    @property
    def is_exact_match(self) -> bool:
        """All three scores 0: the reward is ``em_score`` (the seed recipe)."""
        return not (self.structure_format_score or self.final_format_score or self.retrieval_score)

    def score(self, text: str, golden_answers: str | Iterable[str]) -> float:
        """The training reward of ``text`` (chat-templated prompt + response)."""
        if self.is_exact_match:
            return em_score(text, golden_answers)
        return compute_score_em(
            text,
            {"target": _as_answer_list(golden_answers)},
            structure_format_score=self.structure_format_score,
            final_format_score=self.final_format_score,
            retrieval_score=self.retrieval_score,
        )

    def check_prompt(self, prompt_text: str) -> None:
        """Refuse a format-aware reward behind a prompt under which no response can be format-valid.

        Search-R1's ``is_valid_sequence`` reads the text after the first ``<|im_start|>assistant`` (the Qwen chat
        template's generation prompt): without that marker, or with more prompt text after it, every sequence is
        invalid and the format scores would silently turn into a constant penalty. Checked by scoring well-formed
        responses behind ``prompt_text``: the prompt is refused when none of them is valid.
        """
        if self.is_exact_match:
            return
        verdicts = [is_valid_sequence(prompt_text + response) for response in _CANARY_RESPONSES]
        if any(valid for valid, _ in verdicts):
            return
        reason = verdicts[0][1]
        nonzero = ", ".join(
            f"reward.{name} = {getattr(self, name)}" for name in self.CONFIG_KEYS if getattr(self, name)
        )
        if _ASSISTANT_RE.search(prompt_text) is None:
            why = (
                "the chat-templated prompt has no '<|im_start|>assistant' marker (the tokenizer's chat template is "
                "not Qwen's ChatML)"
            )
        else:
            why = f"the prompt's text after its first '<|im_start|>assistant' marker is not a response ({reason[:160]})"
        raise RewardConfigError(
            f"{nonzero}, but {why}: Search-R1's is_valid_sequence would score every sequence as format-invalid. "
            f"Set the reward.* scores to 0 (exact match) or use a policy whose chat template ends the prompt with "
            f"'<|im_start|>assistant'. Prompt ends with: {prompt_text[-120:]!r}"
        )
