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


def _hidden_and_head(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is not None and base is not model and head is not None:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden, head
    # No separate decoder/head: take full logits (costs vocab x length memory).
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits, None


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
    width = max(len(s) for s in batch.sequences)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (seq, pos) in enumerate(zip(batch.sequences, batch.positions, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        for p in pos:
            if not 1 <= p < len(seq):
                raise ValueError(f"sequence {i}: scored position {p} outside 1..{len(seq) - 1}")
            rows.append(i)
            cols.append(p - 1)  # the logits at p-1 predict token p
            targets.append(seq[p])
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    targets_t = torch.tensor(targets, dtype=torch.long, device=device)
    with autocast_context(device, bf16_autocast):
        hidden, head = _hidden_and_head(model, input_ids, attention_mask)
        selected = hidden[rows_t, cols_t]
        logits = head(selected) if head is not None else selected
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
