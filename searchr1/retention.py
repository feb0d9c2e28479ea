"""Checkpoint retention for slime training: keep the newest K complete Megatron checkpoints and the HF exports
at the configured interval plus the newest, delete the rest.

Why our own pruning. At the pinned slime (624b824a) nothing deletes a checkpoint: ``actor.save_model``
(``slime/backends/megatron_utils/actor.py:571-590``) calls Megatron's ``save_checkpoint`` and then, with
``--save-hf``, writes one HF copy per save; slime has no retention flag (``slime/utils/arguments.py``: only
``--save``, ``--save-interval``, ``--async-save``, ``--no-save-optim``, ``--save-hf``). Megatron's
``--save-retain-interval`` (Megatron-LM 1dcf0daf, the image's, ``megatron/training/checkpointing.py:751-752``:
after a save the previous iteration is deleted unless it is a multiple of N) keeps the last checkpoint plus
every N-th *iteration*, not "the last K", and slime
saves at iteration = rollout id 19, 39, ... (``train.py``: a save after rollout r when (r + 1) % interval == 0,
``slime/utils/misc.py:107-128``), so multiples of N rarely line up. So the train job prunes itself, once
before slime starts (a kill between a save and its prune is cleaned up there) and after every save it sees.

What "complete" means. Megatron writes ``iter_<7 digits>/`` and only then, after every rank finished,
rewrites ``latest_checkpointed_iteration.txt`` (the tracker) with that iteration. A directory at or below the
tracker is complete; one above it is a save in progress (or a kill in the middle of one) and is never
touched. The tracker's own checkpoint is always among the kept ones, whatever K is. HF exports are written
after the Megatron save of the same rollout (actor.py:584-590), one save at a time, so every HF directory but
the newest is finished; the newest is never deleted.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("searchr1.retention")

TRACKER = "latest_checkpointed_iteration.txt"
_MEGATRON_ITER = re.compile(r"^iter_(\d{7})$")
_HF_ITER = re.compile(r"^iter_(\d+)$")


def tracker_iteration(save_dir: str | Path) -> int | None:
    """The iteration of Megatron's tracker file (None: no complete checkpoint yet, or a 'release' one)."""
    path = Path(save_dir) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return int(text) if text.isdigit() else None


def _iter_dirs(root: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return sorted(found)


def complete_checkpoints(save_dir: str | Path) -> list[int]:
    """Iterations of the complete Megatron checkpoints in ``save_dir``, oldest first."""
    latest = tracker_iteration(save_dir)
    if latest is None:
        return []
    return [it for it, _ in _iter_dirs(Path(save_dir), _MEGATRON_ITER) if it <= latest]


def hf_kept(rollout_id: int, hf_interval: int | None, newest: int) -> bool:
    """Whether slime's HF export ``iter_<rollout_id>`` is kept: the newest, or (rollout_id + 1) a multiple
    of ``hf_interval`` (slime names an export after the 0-based rollout id it was saved after)."""
    return rollout_id == newest or (hf_interval is not None and (rollout_id + 1) % hf_interval == 0)


@dataclass
class PruneResult:
    kept: list[int] = field(default_factory=list)
    deleted_checkpoints: list[int] = field(default_factory=list)
    deleted_exports: list[int] = field(default_factory=list)


def prune(
    save_dir: str | Path,
    hf_dir: str | Path | None,
    *,
    keep: int,
    hf_interval: int | None,
    remove: Callable[[Path], None] = lambda p: shutil.rmtree(p, ignore_errors=False),
) -> PruneResult:
    """Delete all but the newest ``keep`` complete checkpoints of ``save_dir`` and the HF exports of
    ``hf_dir`` that are neither at ``hf_interval`` nor the newest. Never touches a save in progress."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    result = PruneResult()
    save_dir = Path(save_dir)
    latest = tracker_iteration(save_dir)
    if latest is not None:
        complete = [(it, p) for it, p in _iter_dirs(save_dir, _MEGATRON_ITER) if it <= latest]
        result.kept = [it for it, _ in complete[-keep:]]
        if latest not in result.kept and any(it == latest for it, _ in complete):  # cannot happen; be certain
            raise AssertionError(f"retention would delete the newest complete checkpoint {latest}")
        for it, path in complete[:-keep]:
            log.info("retention: deleting checkpoint %s (keeping the newest %d: %s)", path, keep, result.kept)
            remove(path)
            result.deleted_checkpoints.append(it)
    if hf_dir is not None:
        exports = _iter_dirs(Path(hf_dir), _HF_ITER)
        if exports:
            newest = exports[-1][0]
            for it, path in exports:
                if not hf_kept(it, hf_interval, newest):
                    log.info(
                        "retention: deleting HF export %s (kept: every %s rollouts and the newest)", path, hf_interval
                    )
                    remove(path)
                    result.deleted_exports.append(it)
    return result


class RetentionWatcher:
    """Prune once now and then every ``interval_s`` while slime trains (a background thread), and once more
    when stopped. A failed prune is logged, never raised into the training."""

    def __init__(
        self,
        save_dir: str | Path,
        hf_dir: str | Path | None,
        *,
        keep: int,
        hf_interval: int | None,
        interval_s: float = 60.0,
    ) -> None:
        self.args = (save_dir, hf_dir)
        self.kwargs = {"keep": keep, "hf_interval": hf_interval}
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-retention", daemon=True)

    def prune_once(self) -> PruneResult | None:
        try:
            return prune(*self.args, **self.kwargs)
        except Exception:  # noqa: BLE001 - retention must never kill a multi-day training run
            log.exception("retention: prune failed (training continues; disk use may grow)")
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.prune_once()

    def __enter__(self) -> RetentionWatcher:
        self.prune_once()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 60)
        self.prune_once()
