"""Atomic, resumable trainer checkpoints: model, optimizer, RNG states and the step counter.

Layout: ``<work_dir>/checkpoints/step_<NNNNNNN>/`` (NNNNNNN = rollouts completed) holding
``model/`` (save_pretrained, safetensors), ``optimizer.pt``, ``rng.pt`` and ``state.json``. A
checkpoint is written into a temporary sibling and renamed into place, so a kill never leaves a
half-written ``step_*``; only the newest ``keep`` are kept. Everything torch-saved is tensors and
plain containers, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchr1.fsutil import publish_dir

CHECKPOINT_RE = re.compile(r"^step_(\d{7})$")


def checkpoints_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "checkpoints"


def capture_rng_state() -> dict[str, Any]:
    version, key, gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "key": torch.tensor(key, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["key"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LoadedCheckpoint:
    path: Path
    completed_steps: int
    optimizer_state: dict[str, Any]
    rng_state: dict[str, Any]
    state: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def list_checkpoints(work_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(work_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(
    work_dir: str | Path,
    *,
    completed_steps: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint for ``completed_steps`` rollouts atomically; prune to the newest ``keep``."""
    root = checkpoints_dir(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{completed_steps:07d}"

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(capture_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "completed_steps": completed_steps}, indent=1))

    publish_dir(final, fill)  # a rerun re-saving the same step replaces it
    for _, old in list_checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".step_*"), *root.glob(".tmp-step_*")]:  # leftovers of a kill mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_latest_checkpoint(work_dir: str | Path) -> LoadedCheckpoint | None:
    found = list_checkpoints(work_dir)
    if not found:
        return None
    steps, path = found[-1]
    return LoadedCheckpoint(
        path=path,
        completed_steps=steps,
        optimizer_state=torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        rng_state=torch.load(path / "rng.pt", weights_only=True),
        state=json.loads((path / "state.json").read_text()),
    )
