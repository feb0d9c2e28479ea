"""Supervised warm start of the toy policy on format demonstrations (the BASE policy of the toy DAG).

The demonstrations are written in the exact agent protocol: the chat-templated prompt, then what the agent's
response would hold (observations rendered by searchr1.agent itself). Most demos (85% by default) search with
a query that names the people of the question (and a two-entity question's constraint, :func:`query_for`),
read the observation (rendered as searchr1.agent renders it; its passages carry only the optional
language-model loss of ``passage_loss_weight``), restate the evidence in the passage's own order and answer;
restating turns reading into copying after a prefix the model can rebuild. In those demos the single
search-or-answer decision token after turn 1's `</think>` carries no loss, so whether to search is taught only
by the remaining demos: mostly a low-entropy guess answered at once, some searches, a few invalid turns. The
result follows the protocol, can read when it searches, and rarely chooses to: what RL then has to change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from searchr1.agent import observation_text
from searchr1.config import FromConfig
from searchr1.grpo.logprobs import common_prefix_length, shared_prefix_hidden
from searchr1.prompt import make_messages
from searchr1.toy.world import SINGLE_HOP_TEMPLATES, TWO_HOP_TEMPLATES, Question, World, article, make_question

log = logging.getLogger(__name__)

Retrieve = Callable[[list[str], int], list[list[dict]]]
TARGET, PASSAGE = 1, 2  # loss-mask values: a model-written token, a retrieved passage's token (0: no loss)


@dataclass
class WarmStartConfig(FromConfig):
    # From the config (toy.warm_start.*, retriever.topk, seed): no defaults here.
    steps: int
    batch_size: int
    lr: float
    topk: int
    seed: int
    attn_implementation: str
    passage_loss_weight: float
    # Not config keys: the demo mix and optimiser details, chosen by measurement on the toy world.
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    n_demos: int = 6000
    two_hop_fraction: float = 0.5
    decision_fraction: float = 0.15  # demos that teach the search-or-answer decision
    decision_answer: float = 0.80  # of those: answer at once with a guess
    decision_search: float = 0.15  # of those: search (the rest: an invalid turn)
    retrieve_extra: int = 5  # hits asked beyond topk, to fill topk after dropping other couples' passages
    bf16: bool = True
    log_every: int = 50

    CONFIG_KEYS: ClassVar[dict[str, str]] = {
        "steps": "toy.warm_start.steps",
        "batch_size": "toy.warm_start.batch_size",
        "lr": "toy.warm_start.lr",
        # An added language-model loss on the demos' retrieved passages: they repeat each name before every
        # fact, so predicting them exercises the copying that reading needs (the copy skill appears in far
        # fewer steps).
        "passage_loss_weight": "toy.warm_start.passage_loss_weight",
        "topk": "retriever.topk",
        "seed": "seed",
        "attn_implementation": "toy.warm_start.attn_implementation",
    }

    def validate(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.n_demos <= 0 or self.topk <= 0:
            raise ValueError(f"steps, batch_size, n_demos and topk must be > 0: {self}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.passage_loss_weight < 0:
            raise ValueError(f"passage_loss_weight must be >= 0, got {self.passage_loss_weight}")
        for name in ("two_hop_fraction", "decision_fraction", "decision_answer", "decision_search"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.decision_answer + self.decision_search > 1.0:
            raise ValueError("decision_answer + decision_search must be <= 1 (the rest are invalid turns)")


@dataclass
class Demo:
    """A prompt and the response segments; each segment is (text, TARGET | PASSAGE | 0: its tokens' loss)."""

    prompt_text: str
    segments: list[tuple[str, int]]
    kind: str  # "search" | "decide_search" | "decide_answer" | "decide_invalid"
    question: Question

    @property
    def response_text(self) -> str:
        return "".join(text for text, _ in self.segments)


@dataclass
class TokenizedDemo:
    input_ids: list[int]
    loss_mask: list[int]  # per token: TARGET (model-written), PASSAGE (retrieved text) or 0 (no loss)
    n_prompt: int


@dataclass
class WarmStartResult:
    steps: int
    final_loss: float
    time_s: float
    n_demos: int
    n_dropped_gold_missing: int
    kinds: dict[str, int]
    loss_log: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def common_values(world: World, couples: list[int], attribute: str, n: int = 3) -> list[str]:
    """The ``n`` most frequent values of ``attribute`` among ``couples`` (ties by value): the guesses."""
    counts = Counter(getattr(world.people[m], attribute) for c in couples for m in world.couple_members(c))
    return [value for value, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def query_for(world: World, question: Question) -> str:
    """The demos' search query: the people the question names, plus a two-entity question's constraint.

    Naming the people is what brings back their passages (for two-entity questions, both at once). The
    constraint ("born in C") ranks the passage of the person it picks first: measured on the toy world's 200
    two-entity test questions, both passages come back for 0.995 (1.0 with the names alone) and the right
    person's passage is Doc 1 for 0.885 (0.515). A 2-layer policy cannot reliably pick that person among the
    passages it reads (with the names alone its two-entity answers were close to a coin toss between the
    two people); reading Doc 1 it can. The whole question as the query ranks that passage first more often
    (0.95) but loses one of the two passages more often too (both back 0.965).
    """
    query = " and ".join(question.names)
    if question.template in TWO_HOP_TEMPLATES:
        # Both two-entity templates ask about "the person born in <subject's city>".
        query += f" born in {world.people[question.subject].city}"
    return query


def evidence_for(world: World, question: Question) -> str:
    """The fact(s) of the answer restated in the passage's own words and order."""
    s, t = world.people[question.subject], world.people[question.target]
    if question.template == "born":
        return f"{s.name} was born in {s.city}"
    if question.template == "occupation":
        return f"{s.name} works as {article(s.job)} {s.job}"
    if question.template == "spouse":
        # The spouse is the answer; the fact is the subject's own (target == subject for this template).
        return f"{s.name} is married to {world.people[s.spouse].name}"
    if question.template == "occupation_of_born_in":
        return f"{s.name} was born in {s.city}, where {s.name} works as {article(s.job)} {s.job}"
    if question.template == "spouse_occupation_of_born_in":
        return (
            f"{s.name} was born in {s.city}. {s.name} is married to {t.name}. "
            f"{t.name} works as {article(t.job)} {t.job}"
        )
    raise ValueError(f"unknown question template {question.template!r}")


def gold_passage_ids(world: World, question: Question) -> set[str]:
    a, b = world.couple_members(question.couple)
    if question.data_source == "hotpotqa":
        return {world.people[a].passage_id, world.people[b].passage_id}
    return {world.people[question.subject].passage_id}


def make_demos(world: World, tokenizer, retrieve: Retrieve, cfg: WarmStartConfig) -> tuple[list[Demo], int]:
    """Demonstrations over the warm-start couples; returns (demos, number dropped for a missed gold passage).

    Retrieved passages of people outside the warm-start couples are dropped from the observation, so that
    RL and test facts never appear in the demos, even in masked context. ``retrieve`` is called once, for
    every searching demo together (the warm-start step stops its retriever server after that call).
    """
    rng = random.Random(f"{cfg.seed}/demos")
    couples = world.splits["warmstart"]
    if not couples:
        raise ValueError("the world has no warm-start couples")
    allowed = {world.people[m].passage_id for c in couples for m in world.couple_members(c)}
    guesses = {
        "born": common_values(world, couples, "city"),
        "occupation": common_values(world, couples, "job"),
        "spouse": common_values(world, couples, "name"),
    }
    plans = []
    for _ in range(cfg.n_demos):
        templates = TWO_HOP_TEMPLATES if rng.random() < cfg.two_hop_fraction else SINGLE_HOP_TEMPLATES
        question = make_question(world, rng.choice(couples), rng.choice(templates), rng)
        kind = "search"
        if rng.random() < cfg.decision_fraction:
            r = rng.random()
            kind = (
                "decide_answer"
                if r < cfg.decision_answer
                else "decide_search"
                if r < cfg.decision_answer + cfg.decision_search
                else "decide_invalid"
            )
        plans.append((question, kind, rng.random()))

    # The query exactly as the agent will send it: the decoded text between the search tags.
    queries = [
        tokenizer.decode(
            tokenizer.encode(query_for(world, q), add_special_tokens=False), skip_special_tokens=True
        ).strip()
        for q, kind, _ in plans
    ]
    searching = [i for i, (_, kind, _) in enumerate(plans) if kind in ("search", "decide_search")]
    hits_of: dict[int, list[dict]] = {}
    if searching:
        results = retrieve([queries[i] for i in searching], cfg.topk + cfg.retrieve_extra)
        if len(results) != len(searching):
            raise RuntimeError(f"retriever returned {len(results)} results for {len(searching)} queries")
        for i, hits in zip(searching, results):
            hits_of[i] = [h for h in hits if str(h["id"]) in allowed][: cfg.topk]

    demos, dropped = [], 0
    for i, (question, kind, guess_draw) in enumerate(plans):
        prompt_text = tokenizer.apply_chat_template(
            make_messages(question.question), tokenize=False, add_generation_prompt=True
        )
        names = " and ".join(question.names)
        think = f"<think> about {names} </think> "
        decision_loss = 0 if kind == "search" else TARGET
        if kind == "decide_answer":
            pool = guesses[
                "spouse" if question.template == "spouse" else "born" if question.template == "born" else "occupation"
            ]
            guess = pool[int(guess_draw * len(pool))]
            segments = [(think, TARGET), ("<answer>", TARGET), (f" {guess} </answer>", TARGET)]
        elif kind == "decide_invalid":
            segments = [(think, TARGET), (f"{question.question}?", TARGET), (tokenizer.eos_token, TARGET)]
        else:
            hits = hits_of[i]
            if not gold_passage_ids(world, question) <= {str(h["id"]) for h in hits}:
                dropped += 1
                continue
            segments = [
                (think, TARGET),
                ("<search>", decision_loss),
                (f" {queries[i]} </search>", TARGET),
                (observation_text(hits), PASSAGE),
                (f"<think> {evidence_for(world, question)} </think> <answer> {question.answer} </answer>", TARGET),
            ]
        demos.append(Demo(prompt_text, segments, kind, question))
    return demos, dropped


def tokenize_demo(tokenizer, demo: Demo) -> TokenizedDemo:
    ids = tokenizer.encode(demo.prompt_text, add_special_tokens=False)
    n_prompt = len(ids)
    mask = [0] * n_prompt
    for text, loss in demo.segments:
        seg = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(seg)
        mask.extend([loss] * len(seg))
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        bad = [t for t in tokenizer.convert_ids_to_tokens(ids) if t == tokenizer.unk_token]
        raise ValueError(
            f"demo text has {len(bad)} word(s) outside the tokenizer's vocabulary: "
            f"{demo.prompt_text + demo.response_text!r}"
        )
    return TokenizedDemo(ids, mask, n_prompt)


def collate(batch: list[TokenizedDemo], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask)."""
    width = max(len(d.input_ids) for d in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    loss = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, d in enumerate(batch):
        n = len(d.input_ids)
        ids[row, :n] = torch.tensor(d.input_ids)
        attn[row, :n] = 1
        loss[row, :n] = torch.tensor(d.loss_mask, dtype=torch.float32)
    return ids, attn, loss


def masked_lm_loss(
    model, ids: torch.Tensor, attn: torch.Tensor, loss_mask: torch.Tensor, bf16: bool, passage_weight: float = 0.0
) -> torch.Tensor:
    """Mean next-token cross entropy over the TARGET tokens, plus ``passage_weight`` x that over PASSAGE tokens."""
    # Autocast around the forward pass only: weights, optimizer state and the loss stay fp32.
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    return _head_loss(model, hidden, ids, loss_mask, bf16, passage_weight)


def _head_loss(
    model, hidden: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor, bf16: bool, passage_weight: float
) -> torch.Tensor:
    targets_mask = loss_mask[:, 1:] > 0 if passage_weight else loss_mask[:, 1:] == TARGET
    # The head only on positions that predict a token with a loss: most of the sequence is prompt/context.
    h = hidden[:, :-1][targets_mask]
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model.lm_head(h)
    targets = ids[:, 1:][targets_mask]
    kinds = loss_mask[:, 1:][targets_mask]
    per_token = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    loss = per_token[kinds == TARGET].mean()
    if passage_weight and bool((kinds == PASSAGE).any()):
        loss = loss + passage_weight * per_token[kinds == PASSAGE].mean()
    return loss


def shared_prefix_length(demos: list[TokenizedDemo]) -> int:
    """Length of the token prefix every demo starts with, kept inside every prompt (so no target lies in it).

    Every warm-start demo opens with the same chat-templated instruction (about 110 of ~240 tokens).
    """
    return common_prefix_length([d.input_ids for d in demos], min(d.n_prompt for d in demos) - 1)


def shared_prefix_loss(
    model, batch: list[TokenizedDemo], prefix_len: int, pad_id: int, bf16: bool, passage_weight: float = 0.0
) -> torch.Tensor:
    """``masked_lm_loss`` of ``batch``, computing the shared first ``prefix_len`` tokens once
    (``shared_prefix_hidden``: same loss and gradients as the full forward)."""
    if prefix_len <= 0:
        return masked_lm_loss(model, *collate(batch, pad_id), bf16, passage_weight)
    prefix = batch[0].input_ids[:prefix_len]
    if any(d.input_ids[:prefix_len] != prefix or d.n_prompt <= prefix_len for d in batch):
        raise ValueError(f"every demo must start with the same {prefix_len} prompt tokens")
    ids, _, loss_mask = collate(
        [TokenizedDemo(d.input_ids[prefix_len:], d.loss_mask[prefix_len:], d.n_prompt - prefix_len) for d in batch],
        pad_id,
    )
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = shared_prefix_hidden(model.model, prefix, ids)
    return _head_loss(model, hidden, ids, loss_mask, bf16, passage_weight)


def train(
    model, tokenizer, demos: list[TokenizedDemo], cfg: WarmStartConfig, progress: Callable[[str], None] | None = None
) -> tuple[float, list[dict]]:
    """AdamW with a short linear warm-up and linear decay; returns (final loss, loss log)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    order_rng = random.Random(f"{cfg.seed}/batches")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    prefix_len = shared_prefix_length(demos)
    order: list[int] = []
    loss_log, window = [], []
    start = time.perf_counter()
    for step in range(cfg.steps):
        # Plain shuffled batches, epoch after epoch. Batches of similar lengths (less padding, 1.3x faster a
        # step) kept the copy phase from appearing: loss 2.30 vs 1.05 after 300 steps on the toy world.
        if len(order) < cfg.batch_size:
            epoch = list(range(len(demos)))
            order_rng.shuffle(epoch)
            order.extend(epoch)
        batch = [demos[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        loss = shared_prefix_loss(model, batch, prefix_len, tokenizer.pad_token_id, cfg.bf16, cfg.passage_loss_weight)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"warm-start loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            entry = {
                "step": step + 1,
                "loss": sum(window) / len(window),
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": round(time.perf_counter() - start, 2),
            }
            loss_log.append(entry)
            window = []
            if progress:
                progress(
                    f"warmstart step {entry['step']}/{cfg.steps} loss {entry['loss']:.4f} "
                    f"lr {entry['lr']:.2e} {entry['elapsed_s']:.1f}s"
                )
    model.eval()
    return loss_log[-1]["loss"], loss_log


def warm_start(
    model_dir: str | Path,
    world: World,
    retrieve: Retrieve,
    out_dir: str | Path,
    cfg: WarmStartConfig,
    progress: Callable[[str], None] | None = None,
) -> WarmStartResult:
    """Warm-start the model in ``model_dir`` and save the base policy (HF dir) to ``out_dir``."""
    cfg.validate()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation=cfg.attn_implementation
    )
    demos, dropped = make_demos(world, tokenizer, retrieve, cfg)
    if not demos:
        raise RuntimeError("no warm-start demos left (the retriever missed every gold passage)")
    tokenized = [tokenize_demo(tokenizer, d) for d in demos]
    if progress:
        progress(
            f"warmstart: {len(demos)} demos ({dropped} dropped: gold passage not retrieved), "
            f"mean length {sum(len(t.input_ids) for t in tokenized) / len(tokenized):.0f} tokens"
        )
    final_loss, loss_log = train(model, tokenizer, tokenized, cfg, progress)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    result = WarmStartResult(
        steps=cfg.steps,
        final_loss=final_loss,
        time_s=round(time.perf_counter() - start, 2),
        n_demos=len(demos),
        n_dropped_gold_missing=dropped,
        kinds=dict(sorted(Counter(d.kind for d in demos).items())),
        loss_log=loss_log,
        config=asdict(cfg),
    )
    (out / "warmstart.json").write_text(json.dumps(asdict(result), indent=1) + "\n", encoding="utf-8")
    return result


def http_retriever(url: str, *, timeout_s: float, max_retries: int, chunk: int = 512) -> Retrieve:
    """A blocking `retrieve` over the HTTP retriever at ``url`` (the full /retrieve URL); ``timeout_s`` and
    ``max_retries`` are the config's retriever.timeout_s and retriever.max_retries."""
    from searchr1.retrieval.client import RetrievalClient

    def retrieve(queries: list[str], topk: int) -> list[list[dict]]:
        async def run() -> list[list[dict]]:
            client = RetrievalClient(url, timeout_s=timeout_s, max_retries=max_retries, batch=True)
            try:
                out: list[list[dict]] = []
                for i in range(0, len(queries), chunk):
                    out.extend(await client.search(queries[i : i + chunk], topk))
                return out
            finally:
                await client.aclose()

        return asyncio.run(run())

    return retrieve


def local_retriever(
    corpus_path: str | Path,
    index_path: str | Path,
    encoder_path: str | Path,
    *,
    encoder_settings: dict,
) -> Retrieve:
    """A `retrieve` over the corpus and faiss index in this process (the retriever server's parts);
    ``encoder_settings``: the config's retriever.encoder section (the index was built with it)."""
    from searchr1.retrieval.corpus import CorpusStore
    from searchr1.retrieval.encoder import Encoder
    from searchr1.retrieval.index import check_pair, load_backend

    check_pair(index_path, corpus_path)
    corpus = CorpusStore(corpus_path)
    enc = encoder_settings
    encoder = Encoder(
        encoder_path,
        query_prefix=enc["query_prefix"],
        passage_prefix=enc["passage_prefix"],
        pooling=enc["pooling"],
        normalize=enc["normalize"],
        max_length=enc["max_length"],
        cpu_bf16=enc["cpu_bf16"],
    )
    backend = load_backend(index_path)

    def retrieve(queries: list[str], topk: int) -> list[list[dict]]:
        _, ids = backend.search(encoder.encode_queries(queries), topk)
        return [corpus.get_many([int(i) for i in row if i >= 0]) for row in ids]

    return retrieve


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
