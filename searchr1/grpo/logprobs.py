"""Per-token logprobs (and entropy) of chosen tokens under a causal LM, for the trained positions only."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenBatch:
    """A micro-batch: full sequences (prompt + response) and, per sequence, the positions scored."""

    sequences: list[list[int]]
    positions: list[list[int]]  # indices into the sequence of the tokens to score (loss mask 1), each >= 1

    @property
    def sample_lengths(self) -> list[int]:
        return [len(p) for p in self.positions]


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    # Autocast around forward passes only; weights and optimizer stay fp32 (measured on the toy world:
    # whole-program bf16 stalled learning).
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def common_prefix_length(sequences: Sequence[Sequence[int]], limit: int) -> int:
    """Length of the token prefix all ``sequences`` share, at most ``limit``."""
    first, n = sequences[0], max(limit, 0)
    for seq in sequences[1:]:
        n = min(n, next((i for i, (a, b) in enumerate(zip(first, seq)) if a != b), min(len(first), len(seq))))
    return n


def shared_prefix_hidden(base: Any, prefix: Sequence[int], rest: torch.Tensor) -> torch.Tensor:
    """Hidden states of ``rest`` (right-padded rows that all continue ``prefix``), computing ``prefix`` once.

    The prefix runs at batch size 1 and its key/value cache is repeated over the rows, so the rows run on
    top of it: the same math as a forward of prefix + row, and gradients reach the prefix through the
    repeated cache. No attention mask is needed: the attention is causal and padding follows every real
    token, so padding changes only the (unused) hidden states of padding positions.
    """
    prefix_ids = torch.tensor([list(prefix)], dtype=torch.long, device=rest.device)
    cache = base(input_ids=prefix_ids, use_cache=True).past_key_values
    cache.batch_repeat_interleave(rest.shape[0])
    return base(input_ids=rest, past_key_values=cache, use_cache=True).last_hidden_state


def _split_model(model: Any) -> tuple[Any, Any]:
    """(decoder, LM head) of an HF causal LM, or (None, None) for a model without that split."""
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is not None and base is not model and head is not None:
        return base, head
    return None, None


def token_logprobs(
    model: Any,
    batch: TokenBatch,
    *,
    temperature: float = 1.0,
    pad_token_id: int = 0,
    device: torch.device | str = "cpu",
    bf16_autocast: bool = False,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs of the scored tokens, flat in batch order, from ``log_softmax(logits / temperature)``.

    slime divides the training logits by the rollout temperature too, so these match what the rollout
    engine reports. The LM head runs only on the positions that predict scored tokens: a 150k-word
    vocabulary over whole sequences would cost gigabytes. Entropy (of the same tempered distribution)
    is returned when asked; it carries gradients iff the caller is under grad mode.
    """
    device = torch.device(device)
    n = len(batch.sequences)
    for i, (seq, pos) in enumerate(zip(batch.sequences, batch.positions, strict=True)):
        for p in pos:
            if not 1 <= p < len(seq):
                raise ValueError(f"sequence {i}: scored position {p} outside 1..{len(seq) - 1}")
    base, head = _split_model(model)
    # The rollouts of one step share their prompt's opening (chat template + instruction, about half of
    # a toy sequence): computed once when the model allows it. It ends before the first scored token's
    # predicting position, so every scored logit comes from the rows' own forward.
    first_scored = min((p for pos in batch.positions for p in pos), default=1)
    prefix = common_prefix_length(batch.sequences, first_scored - 1) if base is not None and n > 1 else 0
    width = max(len(s) for s in batch.sequences) - prefix
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (seq, pos) in enumerate(zip(batch.sequences, batch.positions, strict=True)):
        input_ids[i, : len(seq) - prefix] = torch.tensor(seq[prefix:], dtype=torch.long)
        attention_mask[i, : len(seq) - prefix] = 1
        for p in pos:
            rows.append(i)
            cols.append(p - 1 - prefix)  # the logits at p-1 predict token p
            targets.append(seq[p])
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    targets_t = torch.tensor(targets, dtype=torch.long, device=device)
    with autocast_context(device, bf16_autocast):
        if base is None:  # no separate decoder/head: full logits (costs vocab x length memory)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[rows_t, cols_t]
        else:
            if prefix:
                hidden = shared_prefix_hidden(base, batch.sequences[0][:prefix], input_ids)
            else:
                hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = head(hidden[rows_t, cols_t])
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_probs_all = torch.log_softmax(logits, dim=-1)
    chosen = log_probs_all.gather(1, targets_t.unsqueeze(1)).squeeze(1)
    entropy = None
    if with_entropy:
        entropy = -(log_probs_all.exp() * log_probs_all).sum(dim=-1)
    return chosen, entropy


def scored_positions(prompt_len: int, loss_mask: Sequence[int]) -> list[int]:
    """Sequence indices of the response tokens with loss mask 1."""
    return [prompt_len + i for i, m in enumerate(loss_mask) if m]
