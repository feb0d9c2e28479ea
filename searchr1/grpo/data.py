"""Training prompts from a Search-R1 parquet, in a deterministic, resumable epoch order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class PromptRow:
    prompt_text: str  # chat-templated, ready for the agent
    golden_answers: list[str]
    data_source: str


def _golden_answers(reward_model: Any, row_index: int) -> list[str]:
    try:
        target = reward_model["ground_truth"]["target"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"train row {row_index}: reward_model has no ground_truth.target ({reward_model!r})") from exc
    if isinstance(target, str):
        return [target]
    answers = [str(a) for a in list(target)]
    if not answers:
        raise ValueError(f"train row {row_index}: reward_model.ground_truth.target is empty")
    return answers


def chat_prompt_text(prompt: Any, tokenizer: Any) -> str:
    """A row's ``prompt`` messages through the tokenizer's chat template (slime's --apply-chat-template)."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(prompt)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def first_prompt_text(train_parquet: str | Path, tokenizer: Any) -> str:
    """The chat-templated prompt of the parquet's first row (what the policy sees, before anything starts)."""
    import pyarrow.parquet as pq

    first = pq.ParquetFile(train_parquet).read_row_group(0, columns=["prompt"]).slice(0, 1).to_pylist()
    if not first:
        raise ValueError(f"{train_parquet}: no training rows")
    return chat_prompt_text(first[0]["prompt"], tokenizer)


def load_prompt_rows(train_parquet: str | Path, tokenizer: Any) -> list[PromptRow]:
    """Read the parquet and apply the chat template to each row's ``prompt`` messages
    (slime's --apply-chat-template)."""
    frame = pd.read_parquet(train_parquet, columns=["prompt", "reward_model", "data_source"])
    if frame.empty:
        raise ValueError(f"{train_parquet}: no training rows")
    rows = []
    for i, (prompt, reward_model, source) in enumerate(
        zip(frame["prompt"], frame["reward_model"], frame["data_source"], strict=True)
    ):
        text = chat_prompt_text(prompt, tokenizer)
        rows.append(
            PromptRow(prompt_text=text, golden_answers=_golden_answers(reward_model, i), data_source=str(source))
        )
    return rows


class PromptOrder:
    """The prompt indices of every rollout: epoch after epoch, each epoch a permutation.

    The order is a pure function of (seed, number of rows, shuffle), so resuming at rollout k needs
    only k: the position in the stream is ``k * batch_size``. Like slime's data source, a batch that
    crosses an epoch boundary takes the rest of one epoch and the start of the next.
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int, shuffle: bool) -> None:
        if num_rows < 1 or batch_size < 1:
            raise ValueError(f"need num_rows >= 1 and batch_size >= 1, got {num_rows}, {batch_size}")
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self._epochs: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if self.shuffle:
                self._epochs[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                self._epochs[epoch] = np.arange(self.num_rows)
        return self._epochs[epoch]

    def position(self, rollout_id: int) -> int:
        return rollout_id * self.batch_size

    def batch(self, rollout_id: int) -> list[int]:
        start = self.position(rollout_id)
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, self.num_rows)
            out.append(int(self.epoch_order(epoch)[offset]))
        return out
