"""The Search-R1 multi-turn agent loop: generate -> parse action -> retrieve -> observe, over a batch.

It reproduces slime's ``examples/search-r1/generate_with_search.py`` turn by turn: stop strings
``</search>``/``</answer>`` kept in the text, the first ``<search>``/``<answer>`` action of a turn
decides, observations and the invalid-action reminder are appended as non-trainable tokens, at most
``max_turns`` generation calls (an observation added in the last turn is not followed by another
generation), ``abort`` -> aborted, ``length`` -> truncated. It is written once against the small
``Engine`` protocol, so slime (SGLang), evaluation and the local trainer share it.

Differences from slime's example, all about failure handling: retrieval errors are never silently
turned into empty results (``on_retrieval_error``); an empty query is not sent (our server rejects it)
but answered with an empty ``<information>`` block; over-long queries are cut to ``max_query_chars``
(the encoder truncates far earlier anyway).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from searchr1.engines import Engine, GenerationOutput, GenerationRequest
from searchr1.retrieval.client import RetrievalClient, RetrievalError
from searchr1.reward import extract_answer_from_response, is_valid_sequence, normalize_answer

logger = logging.getLogger(__name__)

STOP_STRINGS: tuple[str, ...] = ("</search>", "</answer>")
ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
INVALID_ACTION_TEXT = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n"
)
ON_RETRIEVAL_ERROR = ("fail", "degrade")


def render_docs(hits: list[dict]) -> str:
    """``Doc {i}(Title: {first line}) {rest}\\n`` per hit, i from 1 (the title keeps its quotes)."""
    rendered = []
    for i, hit in enumerate(hits, start=1):
        title, _, text = hit["contents"].partition("\n")
        rendered.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(rendered)


def observation_text(hits: list[dict]) -> str:
    """The block appended after a search (empty ``<information>`` when there are no hits)."""
    return f"\n\n<information>{render_docs(hits).strip()}</information>\n\n"


def parse_action(text: str) -> tuple[str | None, str]:
    """The first ``<search>``/``<answer>`` action in a turn's text: (action or None, stripped content)."""
    match = ACTION_RE.search(text)
    if match is None:
        return None, ""
    return match.group(1), match.group(2).strip()


@dataclass
class AgentConfig:
    """One agent loop's settings. Built from the config by ``searchr1.evaluate.eval_agent_config`` (the
    evaluation: ``CONFIG_KEYS``), by the torch trainer from GRPOSettings (training: train.rollout_*), and by
    the slime plugin from slime's sampling params; none of the config's values has a default here."""

    max_turns: int
    topk: int
    max_new_tokens: int  # per generation call, as in slime (not a total budget)
    temperature: float
    top_p: float
    top_k: int
    on_retrieval_error: str  # "fail" raises; "degrade" inserts an empty <information> and counts it
    # Not a config key: longer queries are cut before they reach the server (its 4xx limit is 4,096 too).
    max_query_chars: int = 4096

    # The evaluation's agent: training's loop and limits at the evaluation temperature (top_p / top_k are
    # greedy decoding's, given by eval_agent_config).
    CONFIG_KEYS: ClassVar[dict[str, str]] = {
        "max_turns": "agent.max_turns",
        "topk": "retriever.topk",
        "max_new_tokens": "train.rollout_max_response_len",
        "temperature": "eval.temperature",
        "on_retrieval_error": "agent.on_retrieval_error",
    }

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"AgentConfig.max_turns must be >= 1, got {self.max_turns}")
        if self.topk < 1:
            raise ValueError(f"AgentConfig.topk must be >= 1, got {self.topk}")
        if self.max_new_tokens < 1:
            raise ValueError(f"AgentConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.on_retrieval_error not in ON_RETRIEVAL_ERROR:
            raise ValueError(
                f"AgentConfig.on_retrieval_error must be one of {ON_RETRIEVAL_ERROR}, got {self.on_retrieval_error!r}"
            )


@dataclass
class Segment:
    """One contiguous piece of the response: a model turn, an observation, or the invalid-action text."""

    kind: str  # "model" | "observation" | "invalid"
    token_ids: list[int]
    logprobs: list[float]
    text: str
    meta_info: dict[str, Any] | None = None  # the engine's metadata for model turns (SGLang meta_info)

    @property
    def trainable(self) -> bool:
        return self.kind == "model"


@dataclass
class Trajectory:
    prompt_text: str
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    response_text: str = ""
    status: str = "completed"  # "completed" | "truncated" | "aborted"
    num_searches: int = 0
    queries: list[str] = field(default_factory=list)
    retrieved: list[list[dict]] = field(default_factory=list)
    answered: bool = False
    extracted_answer: str | None = None
    format_valid: bool = False
    answer_in_retrieved: bool = False
    retrieval_failures: int = 0
    num_turns: int = 0
    segments: list[Segment] = field(default_factory=list)

    @property
    def full_text(self) -> str:
        return self.prompt_text + self.response_text

    @property
    def n_model_tokens(self) -> int:
        return sum(self.loss_mask)

    def _append(self, segment: Segment) -> None:
        mask = 1 if segment.trainable else 0
        self.segments.append(segment)
        self.response_ids.extend(segment.token_ids)
        self.logprobs.extend(segment.logprobs)
        self.loss_mask.extend([mask] * len(segment.token_ids))
        self.response_text += segment.text


def _retrieved_text(traj: Trajectory) -> str:
    return normalize_answer(" ".join(hit["contents"] for hits in traj.retrieved for hit in hits))


def golden_in_retrieved(traj: Trajectory, golden_answers: list[str]) -> bool:
    """True if any normalised golden answer is a substring of the normalised retrieved passages."""
    text = _retrieved_text(traj)
    return any((g := normalize_answer(answer)) and g in text for answer in golden_answers)


class _Observer:
    """Turns text into non-trainable segments with the policy's tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def segment(self, kind: str, text: str) -> Segment:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return Segment(kind=kind, token_ids=ids, logprobs=[0.0] * len(ids), text=text)


def _check_output(output: GenerationOutput, index: int) -> None:
    if len(output.token_ids) != len(output.logprobs):
        raise ValueError(
            f"engine output {index}: {len(output.token_ids)} token ids but {len(output.logprobs)} logprobs"
        )
    if output.finish_reason not in ("stop", "length", "abort"):
        raise ValueError(f"engine output {index}: unknown finish_reason {output.finish_reason!r}")


async def _search_all(
    retriever: RetrievalClient,
    pending: list[tuple[Trajectory, str]],
    cfg: AgentConfig,
    observer: _Observer,
    turn: int,
) -> None:
    """One retriever call for every search of this turn; append each trajectory's observation."""
    to_send = [(traj, q) for traj, q in pending if q]
    for _, query in pending:
        if not query:
            logger.info("empty search query in turn %d: answered with empty information", turn)
    hits_by_traj: dict[int, list[dict]] = {}
    failed = False
    if to_send:
        queries = [q for _, q in to_send]
        try:
            results = await retriever.search(queries, cfg.topk)
            if len(results) != len(queries):
                raise RetrievalError(f"retriever returned {len(results)} hit lists for {len(queries)} queries")
        except RetrievalError as exc:
            if cfg.on_retrieval_error == "fail":
                logger.error("retrieval failed for %d queries in turn %d: %s", len(queries), turn, exc)
                raise RetrievalError(f"retrieval failed for {len(queries)} queries in turn {turn}: {exc}") from exc
            logger.warning(
                "retrieval failed for %d queries in turn %d; inserting empty <information> (degrade): %s",
                len(queries),
                turn,
                exc,
            )
            failed = True
        else:
            hits_by_traj = {id(traj): hits for (traj, _), hits in zip(to_send, results, strict=True)}
    for traj, query in pending:
        hits = hits_by_traj.get(id(traj), [])
        traj.num_searches += 1
        traj.queries.append(query)
        traj.retrieved.append(hits)
        if failed and query:
            traj.retrieval_failures += 1
        traj._append(observer.segment("observation", observation_text(hits)))


async def run_agent(
    engine: Engine,
    retriever: RetrievalClient,
    tokenizer: Any,
    prompt_texts: list[str],
    cfg: AgentConfig,
) -> list[Trajectory]:
    """Roll out one trajectory per chat-templated prompt, turn-synchronously over the batch."""
    observer = _Observer(tokenizer)
    trajectories = [
        Trajectory(prompt_text=text, prompt_ids=list(tokenizer.encode(text, add_special_tokens=False)))
        for text in prompt_texts
    ]
    live = list(trajectories)
    for turn in range(cfg.max_turns):
        if not live:
            break
        requests = [
            GenerationRequest(
                input_ids=traj.prompt_ids + traj.response_ids,
                text=traj.prompt_text + traj.response_text,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                stop=list(STOP_STRINGS),
            )
            for traj in live
        ]
        outputs = await engine.generate(requests)
        if len(outputs) != len(requests):
            raise ValueError(f"engine returned {len(outputs)} outputs for {len(requests)} requests")

        still_live: list[Trajectory] = []
        pending: list[tuple[Trajectory, str]] = []
        for i, (traj, output) in enumerate(zip(live, outputs, strict=True)):
            _check_output(output, i)
            traj.num_turns += 1
            if output.finish_reason == "abort":
                # As slime: the aborted turn's tokens are dropped and the sample ends here.
                traj.status = "aborted"
                continue
            traj._append(
                Segment(
                    kind="model",
                    token_ids=list(output.token_ids),
                    logprobs=list(output.logprobs),
                    text=output.text,
                    meta_info=output.meta_info,
                )
            )
            if output.finish_reason == "length":
                traj.status = "truncated"
                continue
            traj.status = "completed"
            action, content = parse_action(output.text)
            if action == "answer":
                traj.answered = True
                continue
            if action == "search":
                if len(content) > cfg.max_query_chars:
                    logger.info("search query of %d chars cut to %d", len(content), cfg.max_query_chars)
                    content = content[: cfg.max_query_chars]
                pending.append((traj, content))
            else:
                traj._append(observer.segment("invalid", INVALID_ACTION_TEXT))
            still_live.append(traj)
        if pending:
            await _search_all(retriever, pending, cfg, observer, turn)
        live = still_live

    for traj in trajectories:
        _finalize(traj)
    return trajectories


def _finalize(traj: Trajectory) -> None:
    traj.extracted_answer = extract_answer_from_response(traj.response_text)
    traj.format_valid = is_valid_sequence(traj.full_text)[0]
    answer = normalize_answer(traj.extracted_answer) if traj.extracted_answer is not None else ""
    traj.answer_in_retrieved = bool(answer) and answer in _retrieved_text(traj)
