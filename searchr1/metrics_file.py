"""The per-step metrics file (JSON lines, one ``{"step": n, ...}`` a step), shared by our torch trainer and
the slime launcher; torch-free, so the launcher's imports stay light."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from searchr1.fsutil import write_text_atomic


def truncate_metrics(metrics_path: str | Path, completed_steps: int) -> int:
    """Keep only the metric lines of steps < ``completed_steps`` (0-based); return how many remain."""
    path = Path(metrics_path)
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill: drop it and everything after
        if int(record["step"]) < completed_steps:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(kept)


def _curve_key(point: Mapping[str, Any]) -> tuple[Any, Any, bool]:
    # slime numbers the evaluation before the first update and the one after rollout 0 both 0 (rollout ids):
    # with eval.interval 1 both exist, told apart by before_training
    return point.get("step"), point.get("split"), bool(point.get("before_training", False))


def write_curve_point(curve_path: str | Path, point: Mapping[str, Any]) -> None:
    """Write one learning-curve point (``{"step", "split", "em", ...}``) to the curve file. A point of the same
    (step, split, before_training) already there, from a run that was killed after it and resumed, is replaced,
    not duplicated."""
    path = Path(curve_path)
    key = _curve_key({**point, "step": int(point["step"])})
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and _curve_key(json.loads(line)) != key:
                kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in [*kept, json.dumps(dict(point))]))
