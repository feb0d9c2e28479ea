"""The dense index: build (resumable), metadata/fingerprint checks, and exact top-k search backends.

The on-disk format is faiss's own (``faiss.write_index`` of an ``IndexFlatIP``), so Search-R1's
published ``e5_Flat.index`` drops in unchanged. A sidecar ``<index>.meta.json`` records what the
index was built from (dimension, rows, metric, encoder, corpus fingerprint) so that a server refuses
an index/corpus pair that does not belong together.

Backends share one interface, ``search(queries (n, d) float32, k) -> (scores (n, k) float32, ids (n, k)
int64)``; they are not thread-safe and the server drives each from a single worker thread.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from searchr1.fsutil import atomic_path, open_atomic, write_json_atomic
from searchr1.retrieval.corpus import CorpusStore, corpus_fingerprint, count_rows

if TYPE_CHECKING:  # an annotation only: checking an index/corpus pair or searching must not import torch
    from searchr1.retrieval.encoder import TextEncoder

META_FORMAT = "searchr1-index-meta/1"
# faiss fourccs of the flat indexes whose float vectors lie contiguously in the file.
_FLAT_FOURCCS = {b"IxFI": "ip", b"IxF2": "l2"}
_METRICS = {"ip": 0, "l2": 1}


class IndexPairError(RuntimeError):
    """An index and a corpus that do not belong together (or an index without its metadata)."""


def meta_path_for(index_path: str | os.PathLike) -> Path:
    return Path(str(index_path) + ".meta.json")


# ---------------------------------------------------------------------------------------------
# Reading the faiss file header (cheap: a 60 GB index is never loaded just to learn its shape)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatIndexHeader:
    fourcc: bytes
    dim: int
    ntotal: int
    metric: str  # "ip" | "l2"
    data_offset: int  # byte offset of the (ntotal, dim) float32 matrix


def read_flat_header(index_path: str | os.PathLike) -> FlatIndexHeader:
    """Parse the header of a faiss flat index file (``IndexFlatIP``/``IndexFlatL2``).

    Layout (faiss ``write_index_header`` + ``WRITEXBVECTOR``): fourcc, d:int32, ntotal:int64, two
    int64 dummies, is_trained:uint8, metric_type:int32, then the vector length:uint64 (floats) and the
    floats. Raises ValueError for any other index type or an inconsistent file size.
    """
    path = Path(index_path)
    with open(path, "rb") as f:
        head = f.read(45)
    if len(head) < 45 or head[:4] not in _FLAT_FOURCCS:
        raise ValueError(f"{path} is not a faiss flat (IndexFlatIP/IndexFlatL2) index file")
    dim, ntotal = struct.unpack_from("<iq", head, 4)
    metric_type = struct.unpack_from("<i", head, 33)[0]
    n_floats = struct.unpack_from("<Q", head, 37)[0]
    metric = _FLAT_FOURCCS[head[:4]]
    if metric_type != _METRICS[metric] or n_floats != dim * ntotal:
        raise ValueError(f"{path}: unexpected flat index header (d={dim}, ntotal={ntotal}, floats={n_floats})")
    size = path.stat().st_size
    if size < 45 + 4 * n_floats:
        raise ValueError(f"{path} is truncated: {size} bytes, header promises {45 + 4 * n_floats}")
    return FlatIndexHeader(head[:4], int(dim), int(ntotal), metric, 45)


def index_shape(index_path: str | os.PathLike) -> tuple[int, int, str]:
    """(ntotal, dim, metric) of any faiss index file; flat indexes are read from the header only."""
    try:
        h = read_flat_header(index_path)
        return h.ntotal, h.dim, h.metric
    except ValueError:
        import faiss

        index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        metric = "ip" if index.metric_type == 0 else "l2"
        return int(index.ntotal), int(index.d), metric


def open_flat_vectors(index_path: str | os.PathLike) -> np.ndarray:
    """The (ntotal, dim) float32 vectors of a flat index file, memory-mapped (no copy in RAM).

    Copy-on-write mode so that torch can wrap slices without a read-only warning; nothing is
    ever written back to the file.
    """
    h = read_flat_header(index_path)
    return np.memmap(index_path, dtype=np.float32, mode="c", offset=h.data_offset, shape=(h.ntotal, h.dim))


# ---------------------------------------------------------------------------------------------
# Metadata and the index/corpus pair check
# ---------------------------------------------------------------------------------------------


def _encoder_info(encoder: TextEncoder | None) -> dict | None:
    if encoder is None:
        return None
    return {
        "name": getattr(encoder, "name", type(encoder).__name__),
        "query_prefix": getattr(encoder, "query_prefix", None),
        "passage_prefix": getattr(encoder, "passage_prefix", None),
        "pooling": getattr(encoder, "pooling", None),
        "normalize": getattr(encoder, "normalize", None),
    }


def write_index_meta(
    index_path: str | os.PathLike,
    corpus_path: str | os.PathLike,
    *,
    encoder: dict | None = None,
    source: str = "downloaded",
) -> Path:
    """Record an index's shape and its corpus's fingerprint in ``<index>.meta.json`` (atomically).

    For a downloaded index (``source="downloaded"``); ``build_index`` writes the same record. Fails
    with both names when the index's row count differs from the corpus's.
    """
    index_path, corpus_path = Path(index_path), Path(corpus_path)
    ntotal, dim, metric = index_shape(index_path)
    rows = count_rows(corpus_path)
    if ntotal != rows:
        raise IndexPairError(
            f"index {index_path} has {ntotal} vectors but corpus {corpus_path} has {rows} rows; "
            "row i of the index must be line i of the corpus"
        )
    meta = {
        "format": META_FORMAT,
        "dim": dim,
        "n": ntotal,
        "metric": metric,
        "encoder": encoder,
        "corpus": {"file": corpus_path.name, "fingerprint": corpus_fingerprint(corpus_path)},
        "source": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out = meta_path_for(index_path)
    write_json_atomic(out, meta)
    return out


def read_index_meta(index_path: str | os.PathLike) -> dict:
    """The index's ``.meta.json`` (FileNotFoundError when there is none)."""
    path = meta_path_for(index_path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IndexPairError(f"index metadata {path} is not valid JSON: {e}") from e


def check_pair(index_path: str | os.PathLike, corpus_path: str | os.PathLike) -> dict:
    """Verify that ``index_path`` was built over ``corpus_path``; return the index metadata.

    Raises IndexPairError naming both files when the metadata is missing, the row counts differ, or
    the recorded corpus fingerprint is not this corpus's.
    """
    index_path, corpus_path = Path(index_path), Path(corpus_path)
    for p, what in ((index_path, "index"), (corpus_path, "corpus")):
        if not p.is_file():
            raise IndexPairError(f"{what} file not found: {p} (pair: index {index_path}, corpus {corpus_path})")
    try:
        meta = read_index_meta(index_path)
    except FileNotFoundError:
        raise IndexPairError(
            f"index {index_path} has no metadata file {meta_path_for(index_path)}, so it cannot be checked "
            f"against corpus {corpus_path}; write it with `python -m searchr1.retrieval write-meta "
            f"--index {index_path} --corpus {corpus_path}`"
        ) from None
    ntotal, _, _ = index_shape(index_path)
    rows = count_rows(corpus_path)
    if ntotal != rows or meta.get("n") != ntotal:
        raise IndexPairError(
            f"index {index_path} ({ntotal} vectors, metadata says {meta.get('n')}) does not match corpus "
            f"{corpus_path} ({rows} rows)"
        )
    fp = corpus_fingerprint(corpus_path)
    recorded = (meta.get("corpus") or {}).get("fingerprint")
    if recorded != fp:
        raise IndexPairError(
            f"index {index_path} was built over a different corpus than {corpus_path}: recorded corpus "
            f"fingerprint {recorded}, this corpus has {fp}"
        )
    return meta


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with open_atomic(path, "wb") as f:
        np.save(f, array)


def build_index(
    corpus_path: str | os.PathLike,
    encoder: TextEncoder,
    out_path: str | os.PathLike,
    *,
    batch_size: int,
    shard_size: int,
    metric: str = "ip",
    work_dir: str | os.PathLike | None = None,
    keep_work: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every passage (``encoder.encode_passages(contents)``) into a faiss flat index.

    Resumable by shard: the embeddings of each finished shard of ``shard_size`` rows are saved as
    ``<work_dir>/shard_NNNNNN.npy`` and reused by a rerun, provided the work dir's manifest (corpus
    fingerprint, encoder, shard size) still matches; otherwise the stale shards are discarded.
    Writes ``out_path`` and ``out_path.meta.json`` atomically; removes the work dir unless ``keep_work``.
    """
    import faiss
    from tqdm import tqdm

    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir is not None else out_path.with_name(out_path.name + ".work")
    work.mkdir(parents=True, exist_ok=True)

    corpus = CorpusStore(corpus_path)
    n = len(corpus)
    if n == 0:
        raise ValueError(f"corpus {corpus_path} is empty; nothing to index")
    manifest = {
        "corpus_fingerprint": corpus_fingerprint(corpus_path),
        "encoder": _encoder_info(encoder),
        # What else changes a passage's vector: truncation and precision (retriever.encoder.max_length,
        # fp16, cpu_bf16). Shards encoded under other values are not this index's.
        "encoding": {key: getattr(encoder, key, None) for key in ("max_length", "fp16", "cpu_bf16")},
        "dim": int(encoder.dim),
        "shard_size": shard_size,
    }
    manifest_path = work / "manifest.json"
    # Shards without a manifest (an interrupted first write, an older version) cannot be vouched for either.
    if not manifest_path.exists() or json.loads(manifest_path.read_text()) != manifest:
        for old in work.glob("shard_*.npy"):
            old.unlink()
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    n_shards = (n + shard_size - 1) // shard_size
    shard_files = [work / f"shard_{s:06d}.npy" for s in range(n_shards)]
    with tqdm(total=n, unit="passage", desc=f"encode {Path(corpus_path).name}", disable=not progress) as bar:
        for s, shard_file in enumerate(shard_files):
            start, stop = s * shard_size, min((s + 1) * shard_size, n)
            if shard_file.exists():
                bar.update(stop - start)
                continue
            emb = np.empty((stop - start, encoder.dim), dtype=np.float32)
            for b in range(start, stop, batch_size):
                e = min(b + batch_size, stop)
                texts = [row["contents"] for row in corpus.iter_rows(b, e)]
                emb[b - start : e - start] = encoder.encode_passages(texts)
                bar.update(e - b)
            _save_npy_atomic(shard_file, emb)
    corpus.close()

    index = faiss.IndexFlatIP(encoder.dim) if metric == "ip" else faiss.IndexFlatL2(encoder.dim)
    for shard_file in shard_files:
        index.add(np.ascontiguousarray(np.load(shard_file, mmap_mode="r"), dtype=np.float32))
    with atomic_path(out_path) as tmp:
        faiss.write_index(index, str(tmp))
    del index
    write_index_meta(out_path, corpus_path, encoder=_encoder_info(encoder), source="built")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return out_path


def concat_parts(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Concatenate downloaded index parts (``part_aa``, ``part_ab``, ...) into one file, streaming.

    The result appears atomically; an existing ``out`` whose size equals the parts' total is kept.
    """
    parts = [Path(p) for p in parts]
    out = Path(out)
    if not parts:
        raise ValueError("concat_parts needs at least one part")
    for p in parts:
        if not p.is_file():
            raise FileNotFoundError(f"index part not found: {p}")
    total = sum(p.stat().st_size for p in parts)
    if out.exists() and out.stat().st_size == total:
        return out
    with open_atomic(out, "wb") as fout:
        for p in parts:
            with open(p, "rb") as fin:
                shutil.copyfileobj(fin, fout, length=64 * 1024 * 1024)
    return out


# ---------------------------------------------------------------------------------------------
# Search backends
# ---------------------------------------------------------------------------------------------


class SearchBackend(Protocol):
    name: str
    ntotal: int
    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def _check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (n, {dim}), got {queries.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return queries


class FaissCPUBackend:
    """Exact search with a faiss index in CPU memory (the default)."""

    name = "faiss"

    def __init__(self, index) -> None:
        self.index = index
        self.ntotal = int(index.ntotal)
        self.dim = int(index.d)

    @classmethod
    def from_file(cls, index_path: str | os.PathLike, *, mmap: bool = False) -> FaissCPUBackend:
        import faiss

        # mmap: the flat codes stay in the page cache instead of being read up front (fast start-up).
        flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        return cls(faiss.read_index(str(index_path), flags))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim, k)
        k = min(k, self.ntotal)
        scores, ids = self.index.search(queries, k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


class FaissGPUBackend(FaissCPUBackend):
    """faiss on all visible GPUs, fp16, the index sharded across them (needs a faiss GPU build)."""

    name = "faiss_gpu"

    def __init__(self, index) -> None:
        import faiss

        if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
            raise RuntimeError("faiss_gpu backend needs a faiss build with GPU support and a visible GPU")
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
        co.shard = True
        super().__init__(faiss.index_cpu_to_all_gpus(index, co=co))


def topk_grouped(scores, k: int, group: int):
    """Exact top-``k`` (values, positions) of each row of ``scores`` (n, L), in two cheap passes.

    ``torch.topk`` over millions of columns is a multi-pass radix select that costs several times
    the matmul that made the scores. Instead: one pass takes the max of every ``group`` consecutive
    columns, a small top-k over those maxima picks the ``k`` groups that can hold a row's top-k (at
    most ``k`` groups have a max at or above the k-th value), and a top-k over those ``k * group``
    columns (plus any tail shorter than a group) gives the answer. Same values as ``torch.topk``;
    which of several equal values is returned may differ.
    """
    import torch

    n, length = scores.shape
    k = min(k, length)
    n_groups = length // group
    if group <= 1 or n_groups <= k:
        return torch.topk(scores, k, dim=1)
    full = n_groups * group
    grouped = scores[:, :full].view(n, n_groups, group)  # splits the last dim: valid for a row slice
    best_groups = torch.topk(grouped.amax(dim=2), k, dim=1).indices  # (n, k)
    vals = grouped.gather(1, best_groups.unsqueeze(2).expand(n, k, group)).reshape(n, k * group)
    offsets = torch.arange(group, device=scores.device)
    pos = (best_groups.unsqueeze(2) * group + offsets).reshape(n, k * group)
    if full < length:  # columns past the last whole group are all candidates
        vals = torch.cat([vals, scores[:, full:]], dim=1)
        tail = torch.arange(full, length, device=scores.device).expand(n, length - full)
        pos = torch.cat([pos, tail], dim=1)
    top_vals, where = torch.topk(vals, k, dim=1)
    return top_vals, pos.gather(1, where)


def merge_topk(scores, ids, k: int):
    """Top-``k`` of candidate (scores, ids) pairs (n, m): the merge step of a sharded search."""
    import torch

    top_s, where = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top_s, ids.gather(1, where)


class TorchBackend:
    """Exact inner-product search by torch matmul + top-k over row chunks.

    On CUDA the vectors are split into contiguous shards, one per visible GPU, stored in fp16 (half
    the memory of faiss's fp32 clone). Each shard is scored in chunks into a reused fp16 buffer; the
    ``candidates`` best rows of each chunk (more than ``k``, so fp16 rounding of the scores cannot
    lose a true hit) are kept on the GPU, re-scored in fp32 against the stored vectors at the end,
    and only the final (n, k) per shard cross to the host: one sync per search, not one per chunk.
    Every shard works on its own CUDA stream, so the GPUs run concurrently (and an encoder on the
    default stream could overlap a search). On CPU it scores the (possibly memory-mapped) fp32 vectors
    chunk by chunk (``method="plain"``).
    """

    name = "torch"
    # Chunk rows are capped so that one score block stays under this many bytes (n queries x rows).
    SCORE_BUFFER_BYTES = 2 << 30

    def __init__(
        self,
        vectors: np.ndarray,
        *,
        device: str | None = None,
        chunk_rows: int | None = None,
        fp16: bool | None = None,
        method: str | None = None,
        group: int = 1024,
        candidates: int = 16,
    ) -> None:
        import torch

        if vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D, got shape {vectors.shape}")
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type == "cuda":
            devices = (
                [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if dev.index is None else [dev]
            )
        else:
            devices = [dev]
        fp16 = (dev.type == "cuda") if fp16 is None else fp16
        dtype = torch.float16 if fp16 else torch.float32
        ntotal = int(vectors.shape[0])
        # Shards: (row offset, tensor on its device). Copied piecewise so that no second full
        # host copy of the index is made.
        shards: list[tuple[int, object]] = []
        bounds = np.linspace(0, ntotal, len(devices) + 1).astype(np.int64)
        for d, device_ in enumerate(devices):
            lo, hi = int(bounds[d]), int(bounds[d + 1])
            if device_.type == "cpu" and not fp16 and vectors.dtype == np.float32:
                shard = torch.from_numpy(np.asarray(vectors[lo:hi]))  # a view, no copy
            else:
                shard = torch.empty((hi - lo, vectors.shape[1]), dtype=dtype, device=device_)
                step = 1 << 18
                for s in range(lo, hi, step):
                    e = min(s + step, hi)
                    piece = torch.from_numpy(np.ascontiguousarray(vectors[s:e], dtype=np.float32))
                    shard[s - lo : e - lo] = piece.to(device_, dtype=dtype)
            shards.append((lo, shard))
        self._setup(shards, ntotal, int(vectors.shape[1]), dtype, chunk_rows, method, group, candidates)

    @classmethod
    def from_shards(
        cls,
        shards: Sequence[object],
        *,
        fp16: bool = True,
        chunk_rows: int | None = None,
        method: str | None = None,
        group: int = 1024,
        candidates: int = 16,
    ) -> TorchBackend:
        """A backend over torch tensors already placed on their devices (row shards in order).

        Each shard is converted to fp16 (or fp32) on its own device, piecewise; a shard already in
        that dtype is used as it is (no copy). For benchmarks that build the vectors on the GPU.
        """
        import torch

        dtype = torch.float16 if fp16 else torch.float32
        placed, lo = [], 0
        for t in shards:
            if t.ndim != 2:
                raise ValueError(f"shards must be 2-D, got shape {tuple(t.shape)}")
            if t.dtype != dtype or not t.is_contiguous():
                out = torch.empty(t.shape, dtype=dtype, device=t.device)
                for s in range(0, t.shape[0], 1 << 20):
                    out[s : s + (1 << 20)] = t[s : s + (1 << 20)]
                t = out
            placed.append((lo, t))
            lo += int(t.shape[0])
        self = cls.__new__(cls)
        self._setup(placed, lo, int(shards[0].shape[1]), dtype, chunk_rows, method, group, candidates)
        return self

    def _setup(self, shards, ntotal, dim, dtype, chunk_rows, method, group, candidates) -> None:
        import torch

        self.ntotal, self.dim, self.dtype = ntotal, dim, dtype
        self.fp16 = dtype == torch.float16
        self.shards = shards
        self.devices = [s.device for _, s in shards]
        cuda = self.devices[0].type == "cuda"
        method = method or ("grouped" if cuda else "plain")
        if method not in ("grouped", "plain"):
            raise ValueError(f"method must be 'grouped' or 'plain', got {method!r}")
        if group <= 0 or candidates < 0:
            raise ValueError(f"group must be > 0 and candidates >= 0, got {group}, {candidates}")
        self.method, self.group, self.candidates = method, group, candidates
        # CPU: 128k-row chunks keep a 256-query score block at 128 MiB (measured 15% faster than 1M
        # rows). CUDA "grouped": 4M rows per chunk (fewer launches; see docs/retriever.md); "plain"
        # keeps the former 1M.
        default_chunk = (1 << 22 if method == "grouped" else 1 << 20) if cuda else (1 << 17)
        self.chunk_rows = chunk_rows or default_chunk
        self._streams = [torch.cuda.Stream(device=d) if d.type == "cuda" else None for d in self.devices]
        # The fp32 host vectors for the single-query scan (CPU, one shard, fp32, faiss importable).
        self._host = None
        self._pool = None
        self._scan_threads = max(1, torch.get_num_threads())
        if method == "plain" and not cuda and len(shards) == 1 and dtype == torch.float32:
            try:
                import faiss  # noqa: F401

                self._host = shards[0][1].numpy()
            except ImportError:
                pass
        self._buffers: list[object | None] = [None] * len(shards)
        # Whether the server should keep two batches in flight (encode one while this searches on
        # its own streams). Off: measured through HTTP on H200s it lowered QPS (GIL contention
        # between the encoder's Python and the event loop; docs/retriever.md, GPU section).
        self.overlaps_encode = False
        self.name = f"torch-{self.devices[0].type}{'-fp16' if self.fp16 else ''}x{len(self.devices)}"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim, k)
        k = min(k, self.ntotal)
        if self.method == "plain":
            if len(queries) <= self.SCAN_MAX_QUERIES and self._host is not None:
                return self._search_scan(queries, k)
            return self._search_plain(queries, k)
        return self._search_grouped(queries, k)

    # One or two queries on a CPU: a scan, not a matrix product. Measured on 2 AVX-512 cores, 1M x 768
    # fp32, one query: faiss's SIMD inner-product loop reads 18.7 GB/s on one thread, torch's mv (MKL
    # sgemv) 8.6 GB/s; so single queries go to faiss's kernel, over row ranges on every thread.
    SCAN_MAX_QUERIES = 2

    def _search_scan(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by ``faiss.knn`` (inner product) over ``threads`` row ranges in parallel (it releases
        the GIL and scans a range single-threaded for so few queries), merged; no copy of the vectors."""
        import faiss

        x = self._host
        parts = np.linspace(0, len(x), self._scan_threads * 2 + 1).astype(np.int64)
        ranges = [(int(lo), int(hi)) for lo, hi in zip(parts[:-1], parts[1:]) if hi > lo]

        def scan(r: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = r
            d, i = faiss.knn(queries, x[lo:hi], min(k, hi - lo), metric=faiss.METRIC_INNER_PRODUCT)
            return d, i + lo

        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self._scan_threads, thread_name_prefix="scan")
        found = list(self._pool.map(scan, ranges))
        all_s = np.concatenate([d for d, _ in found], axis=1)
        all_i = np.concatenate([i for _, i in found], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(all_s, order, 1).astype(np.float32), np.take_along_axis(all_i, order, 1).astype(
            np.int64
        )

    def _search_plain(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q_host = torch.from_numpy(queries)
        cand_scores, cand_ids = [], []
        with torch.inference_mode():
            for lo, shard in self.shards:
                q = q_host.to(shard.device, dtype=shard.dtype)
                for s in range(0, shard.shape[0], self.chunk_rows):
                    chunk = shard[s : s + self.chunk_rows]
                    scores = q @ chunk.T
                    kk = min(k, chunk.shape[0])
                    top_s, top_i = torch.topk(scores.float(), kk, dim=1)
                    cand_scores.append(top_s.cpu())
                    cand_ids.append((top_i + (lo + s)).cpu())
            all_s = torch.cat(cand_scores, dim=1)
            all_i = torch.cat(cand_ids, dim=1)
            top_s, pos = torch.topk(all_s, k, dim=1)
            top_i = torch.gather(all_i, 1, pos)
        return top_s.numpy().astype(np.float32, copy=False), top_i.numpy().astype(np.int64, copy=False)

    def _score_buffer(self, d: int, n: int, rows: int):
        """A flat fp16/fp32 buffer of at least n * rows elements on shard d's device, kept between calls."""
        import torch

        buf = self._buffers[d]
        if buf is None or buf.numel() < n * rows:
            self._buffers[d] = None  # free the old one first
            buf = self._buffers[d] = torch.empty(n * rows, dtype=self.dtype, device=self.devices[d])
        return buf

    def _shard_topk(self, d: int, q32, k: int):
        """Launch shard d's search on the current stream; return its (n, k) fp32 scores and global ids."""
        import torch

        lo, shard = self.shards[d]
        n, rows = q32.shape[0], shard.shape[0]
        q = q32.to(shard.dtype)
        chunk = max(1, min(self.chunk_rows, self.SCORE_BUFFER_BYTES // (n * shard.element_size())))
        kc = min(k + self.candidates, rows)
        buf = self._score_buffer(d, n, min(chunk, rows))
        cand = []
        for s in range(0, rows, chunk):
            block = shard[s : s + chunk]
            scores = buf[: n * block.shape[0]].view(n, block.shape[0])
            torch.mm(q, block.T, out=scores)
            _, pos = topk_grouped(scores, kc, self.group)
            cand.append(pos + s)
        cand_ids = torch.cat(cand, dim=1) if len(cand) > 1 else cand[0]
        # Re-score the candidates in fp32 (elementwise, so no TF32 even if a caller enabled it): the
        # fp16 scores only chose them; the returned scores and order are fp32 over the stored rows.
        exact = (shard[cand_ids].float() * q32.unsqueeze(1)).sum(dim=2)
        top_s, top_i = merge_topk(exact, cand_ids, k)
        return top_s, top_i + lo

    def _search_grouped(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import contextlib

        import torch

        q_host = torch.from_numpy(queries)
        cuda = self._streams[0] is not None
        if cuda:
            q_host = q_host.pin_memory()  # lets the copies to the GPUs run asynchronously
        parts = []
        with torch.inference_mode():
            # Launch every shard first (asynchronous on CUDA), collect afterwards: the GPUs overlap.
            for d, (_, shard) in enumerate(self.shards):
                if shard.shape[0] == 0:
                    continue
                ctx = torch.cuda.stream(self._streams[d]) if cuda else contextlib.nullcontext()
                with ctx:
                    q32 = q_host.to(shard.device, non_blocking=True)
                    parts.append((d, *self._shard_topk(d, q32, k)))
            host = []
            for d, s, i in parts:
                ctx = torch.cuda.stream(self._streams[d]) if cuda else contextlib.nullcontext()
                with ctx:
                    host.append((s.cpu(), i.cpu()))
            if len(host) == 1:
                top_s, top_i = host[0]
            else:
                top_s, top_i = merge_topk(torch.cat([s for s, _ in host], 1), torch.cat([i for _, i in host], 1), k)
        return top_s.numpy().astype(np.float32, copy=False), top_i.numpy().astype(np.int64, copy=False)


def load_backend(
    index_path: str | os.PathLike,
    kind: str = "auto",
    *,
    device: str | None = None,
    mmap: bool = False,
) -> SearchBackend:
    """Open ``index_path`` with the requested backend.

    ``auto``: on a machine with CUDA, faiss on the GPUs if this faiss has GPU support, else the torch
    backend; without CUDA, the torch backend for an inner-product flat index (measured on 2 AVX-512
    cores: 5x faster than faiss-cpu for a batch of 256 queries, 1.3x for one), else faiss on the CPU.
    """
    import faiss

    kinds = ("auto", "faiss", "faiss_gpu", "torch")
    if kind not in kinds:
        raise ValueError(f"backend must be one of {kinds}, got {kind!r}")
    if not Path(index_path).is_file():
        raise FileNotFoundError(f"index file not found: {index_path}")
    if kind == "auto":
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        if cuda:
            kind = "faiss_gpu" if hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0 else "torch"
        else:
            try:
                kind = "torch" if read_flat_header(index_path).metric == "ip" else "faiss"
            except ValueError:  # not a flat index: only faiss can read it
                kind = "faiss"
    if kind == "faiss":
        return FaissCPUBackend.from_file(index_path, mmap=mmap)
    if kind == "faiss_gpu":
        return FaissGPUBackend(faiss.read_index(str(index_path)))
    header = read_flat_header(index_path)
    if header.metric != "ip":
        raise ValueError(f"torch backend supports inner-product flat indexes only; {index_path} is {header.metric}")
    return TorchBackend(open_flat_vectors(index_path), device=device)
