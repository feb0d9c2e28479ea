"""Atomic file and directory writes: a reader (or a rerun after a kill) sees the old version or the new
one, never a torn one. Every stage writes its outputs through these; nothing else in the package writes a
temp file and renames it by hand.

- ``atomic_path(path)``: a temp path beside ``path`` for a writer that wants a file name (faiss, parquet),
  renamed into place when the block ends without error, removed when it raises.
- ``open_atomic(path, mode)``: the same with an open file, fsync'd before the rename.
- ``write_text_atomic`` / ``write_json_atomic`` / ``copy_file_atomic``: whole files.
- ``publish_dir`` / ``copy_tree_atomic``: whole directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path in ``path``'s directory; rename it to ``path`` when the block ends without
    error, remove it when the block raises (also on KeyboardInterrupt and SystemExit)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open`` a temp file beside ``path`` for writing (``mode`` "w" or "wb"); when the block ends without
    error it is flushed, fsync'd and renamed to ``path``; when it raises it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic writes a new file: mode 'w' or 'wb', not {mode!r}")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` through a synced temp file in the same directory, then rename it into place."""
    with open_atomic(path, "w") as fh:
        fh.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, UTF-8) atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def publish_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move a finished file that another program wrote at ``src`` (e.g. ``<dst>.partial``) to ``dst`` in one
    rename (same filesystem), so a reader never sees a half-written ``dst``."""
    os.replace(src, dst)
    return Path(dst)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def publish_dir(dst: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write a temp directory beside ``dst``, then swap it in for ``dst``."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        fill(tmp)
        move_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def move_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rename the directory ``src`` to ``dst`` (same filesystem), replacing a directory already at ``dst``."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def copy_tree_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a directory so that ``dst`` appears whole or not at all."""
    return publish_dir(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
