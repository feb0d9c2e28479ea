"""The passage store over a Search-R1 JSONL corpus: O(1) row lookup without loading the corpus.

Row ``i`` of the corpus is line ``i`` of the JSONL file and row ``i`` of the faiss index. A sidecar
offsets file (``<corpus>.offsets.npy``, int64) holds the byte offset at which each line starts plus,
as its last entry, the file size, so row ``i`` is the byte range ``[off[i], off[i+1])``. The offsets
are memory-mapped, so a 21M-row corpus costs ~170 MB of page cache and no Python objects.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from searchr1.fsutil import open_atomic

# Bytes read per chunk while scanning for newlines (offsets, row counts, decompression).
_SCAN_CHUNK = 16 * 1024 * 1024
# Bytes hashed at each end of the file for the fingerprint.
FINGERPRINT_EDGE_BYTES = 1024 * 1024


class CorpusError(RuntimeError):
    """A corpus file (or its offsets) is missing, malformed or out of date."""


def offsets_path_for(corpus_path: str | os.PathLike) -> Path:
    """Where the offsets of ``corpus_path`` live: ``<corpus>.offsets.npy``."""
    return Path(str(corpus_path) + ".offsets.npy")


def offsets_are_fresh(corpus_path: str | os.PathLike) -> bool:
    """True when the offsets file exists, is not older than the corpus and ends at the corpus size."""
    corpus_path = Path(corpus_path)
    off = offsets_path_for(corpus_path)
    if not off.exists():
        return False
    st = corpus_path.stat()
    if off.stat().st_mtime_ns < st.st_mtime_ns:
        return False
    offsets = np.load(off, mmap_mode="r")
    return len(offsets) >= 1 and int(offsets[-1]) == st.st_size


def build_offsets(corpus_path: str | os.PathLike, *, force: bool = False) -> Path:
    """Scan the corpus once and write its line-start offsets (atomically); return the offsets path.

    Skips the work when an offsets file that matches the corpus size already exists (unless ``force``).
    A final line without a trailing newline is still a row; an empty file has zero rows.
    """
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise CorpusError(f"corpus file not found: {corpus_path}")
    out = offsets_path_for(corpus_path)
    size = corpus_path.stat().st_size
    if not force and offsets_are_fresh(corpus_path):
        return out

    starts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)] if size > 0 else []
    pos = 0
    with open(corpus_path, "rb") as f:
        while True:
            chunk = f.read(_SCAN_CHUNK)
            if not chunk:
                break
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 0x0A).astype(np.int64)
            starts.append(newlines + pos + 1)  # a line starts right after each newline
            pos += len(chunk)
    offsets = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    # A newline at the very end does not start another row; the end marker is the file size.
    if len(offsets) and offsets[-1] == size:
        offsets = offsets[:-1]
    offsets = np.append(offsets, np.int64(size))

    with open_atomic(out, "wb") as f:
        np.save(f, offsets)
    return out


def count_rows(corpus_path: str | os.PathLike) -> int:
    """Number of rows (lines) of the corpus; uses a matching offsets file when there is one."""
    corpus_path = Path(corpus_path)
    size = corpus_path.stat().st_size
    if offsets_are_fresh(corpus_path):
        return len(np.load(offsets_path_for(corpus_path), mmap_mode="r")) - 1
    if size == 0:
        return 0
    newlines = 0
    last = b""
    with open(corpus_path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    return newlines + (0 if last == b"\n" else 1)


def corpus_fingerprint(corpus_path: str | os.PathLike) -> str:
    """A cheap identity of a corpus file, recorded by the index and checked when the pair is loaded.

    ``"v1:<size>:<rows>:<sha256[:16]>"`` where the hash covers the first and the last
    ``FINGERPRINT_EDGE_BYTES`` (1 MiB) of the file. It does not read the middle of the file, so it
    costs one offsets lookup (or one newline scan) plus 2 MiB of hashing even for the 21M-row wiki-18;
    it catches a different corpus, a truncated or re-ordered-at-the-ends file and a different row
    count, not an edit confined to the middle.
    """
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise CorpusError(f"corpus file not found: {corpus_path}")
    size = corpus_path.stat().st_size
    digest = hashlib.sha256()
    with open(corpus_path, "rb") as f:
        digest.update(f.read(FINGERPRINT_EDGE_BYTES))
        if size > FINGERPRINT_EDGE_BYTES:
            f.seek(max(FINGERPRINT_EDGE_BYTES, size - FINGERPRINT_EDGE_BYTES))
            digest.update(f.read())
    return f"v1:{size}:{count_rows(corpus_path)}:{digest.hexdigest()[:16]}"


def decompress_gz(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Decompress ``src`` (.gz) to ``dst``, streaming, via a temp file renamed into place.

    ``dst`` only ever appears complete, so an existing ``dst`` means a finished earlier run and the
    call returns at once; an interrupted run leaves only a temp file, which the next run replaces.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        return dst
    if not src.is_file():
        raise CorpusError(f"compressed corpus not found: {src}")
    with gzip.open(src, "rb") as fin, open_atomic(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=_SCAN_CHUNK)
    return dst


class CorpusStore:
    """Read-only random access to the rows of a JSONL corpus through its offsets file.

    Thread-safe: reads use ``os.pread`` on one file descriptor (no shared file position).
    """

    def __init__(self, path: str | os.PathLike, *, build_offsets_if_needed: bool = True) -> None:
        """Open ``path``; a missing or stale offsets file is rebuilt (one scan) unless told not to."""
        self.path = Path(path)
        if not self.path.is_file():
            raise CorpusError(f"corpus file not found: {self.path}")
        off = offsets_path_for(self.path)
        if not offsets_are_fresh(self.path):
            if not build_offsets_if_needed:
                raise CorpusError(
                    f"offsets file {off} is missing or older than / not matching corpus {self.path}; "
                    f"rebuild it with `python -m searchr1.retrieval offsets {self.path}`"
                )
            build_offsets(self.path, force=True)
        self._offsets = np.load(off, mmap_mode="r")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get_raw(self, i: int) -> bytes:
        """The bytes of row ``i`` without its trailing newline."""
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for corpus {self.path} with {n} rows")
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        data = os.pread(self._fd, end - start, start)
        return data.rstrip(b"\r\n")

    def get(self, i: int) -> dict:
        """Row ``i`` exactly as stored (the parsed JSON object, e.g. ``{"id", "contents"}``)."""
        raw = self.get_raw(i)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise CorpusError(f"row {i} of corpus {self.path} is not valid JSON: {e}") from e

    def get_many(self, ids: Sequence[int]) -> list[dict]:
        return [self.get(int(i)) for i in ids]

    def iter_rows(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Rows ``start..stop-1`` in order (sequential reads, for index building)."""
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop):
            yield self.get(i)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> CorpusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
