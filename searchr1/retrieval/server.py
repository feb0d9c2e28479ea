"""The retrieval HTTP server: Search-R1's ``/retrieve`` API with cross-request micro-batching.

One worker thread owns the encoder and the search backend (faiss GPU indexes are not thread-safe,
and one big matmul beats many small ones). Request handlers validate their input, put the queries on
a queue and await a future. The batching task fills each batch round-robin from the waiting requests
until it holds ``max_batch_size`` queries (or ``max_batch_chars`` characters) or ``max_wait_ms`` have
passed, encodes and searches them in one call, and resolves the requests it completed. With
``batching=False`` the worker takes one request at a time (the per-request baseline that Search-R1's
server amounts to), same code otherwise.

Hostile clients (see ``HttpLimits``): header size and count are bounded (431), idle connections and
stalled headers or bodies time out (408), a client that leaves at any point is counted, never an
error; SIGTERM/SIGINT stop the server within ``shutdown_grace_s`` whatever the clients do, a second
signal stops it at once, and a watchdog hard-exits a shutdown that overruns the grace period.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from searchr1.retrieval.guarded_protocol import guarded_protocol

if TYPE_CHECKING:  # kept out of the import path: the encoder module pulls in torch
    from searchr1.retrieval.corpus import CorpusStore
    from searchr1.retrieval.encoder import TextEncoder
    from searchr1.retrieval.index import SearchBackend

log = logging.getLogger("searchr1.retrieval.server")

# A batch's character budget: 256 typical queries (< 256 characters) fit, so slime's one-query
# requests batch as before; 256 queries at the 4,096-character limit are served in 16 slices.
DEFAULT_MAX_BATCH_CHARS = 65536


class ClientError(Exception):
    """A request the client got wrong; becomes a 4xx JSON reply naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)
class _Job:
    queries: list[str]
    topk: int
    return_scores: bool
    future: asyncio.Future
    sent: int = 0  # queries handed to batches so far (the next slice starts here)
    answered: int = 0
    results: list | None = None  # per-query hits, filled slice by slice
    token_ids: list[list[int]] | None = None  # the queries already tokenized (by a front end), or None


_Slice = tuple[_Job, int, int]  # (job, first query, one past the last)


class BatchingWorker:
    """Batches queries across requests; one thread owns encoder, backend and corpus lookups.

    The batching loop is an asyncio task on the server's event loop (no cross-thread queue, so no
    GIL ping-pong per request); each batch's encode + search + lookups run in a single-thread
    executor, which serialises every use of the encoder and the index. While a batch computes, new
    requests pile up in the queue and form the next batch.

    Fairness: a batch is filled round-robin, one query from each waiting request in turn (oldest
    first), up to ``max_batch_size`` queries and ``max_batch_chars`` characters. A request larger
    than that is served in slices over several batches, and a request that arrives meanwhile joins
    the next batch, so it waits for at most the batch in flight, not for the whole large request.
    """

    def __init__(
        self,
        corpus: CorpusStore | None,
        encoder: TextEncoder,
        backend: SearchBackend,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        batching: bool = True,
        max_batch_chars: int = DEFAULT_MAX_BATCH_CHARS,
        pipeline: int | None = None,
    ) -> None:
        """``corpus=None``: answer with raw hits, ``[scores, ids]`` per query (the multi-process server's
        GPU worker, whose HTTP front ends look the passages up themselves). ``pipeline``: batches in
        flight at once (default: 2 when the backend searches on its own CUDA streams, else 1)."""
        if max_batch_size <= 0 or max_wait_ms < 0 or max_batch_chars <= 0:
            raise ValueError(
                "max_batch_size and max_batch_chars must be > 0 and max_wait_ms >= 0, "
                f"got {max_batch_size}, {max_batch_chars}, {max_wait_ms}"
            )
        self.corpus = corpus
        self.encoder = encoder
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_batch_chars = max_batch_chars
        self.max_wait_s = max_wait_ms / 1000.0
        self.batching = batching
        self._queue: asyncio.Queue[_Job] | None = None
        self._active: list[_Job] = []  # admitted jobs with queries not yet sent, oldest first
        self._pending = 0  # queries of _active not yet sent
        self._queued = 0  # queries of the jobs still in _queue
        self._filled: asyncio.Event | None = None  # set when a batch waiting to fill up is full
        self._unresolved: set[_Job] = set()  # every job whose future is open (failed on stop)
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.requests = 0
        self.queries = 0
        self.max_batch_seen = 0
        self.busy_s = 0.0
        # Where the worker's time goes (seconds, summed over batches); read by the benchmark.
        self.encode_s = 0.0
        self.search_s = 0.0
        self.lookup_s = 0.0
        self.unique_queries = 0  # after de-duplication within each batch
        self.pretokenized_queries = 0  # of those, encoded from token ids a front end sent
        self.split_requests = 0  # requests served over more than one batch
        # Two batches in flight when the backend searches on its own CUDA streams (torch on GPU):
        # one encodes while the other searches; each stage still runs one batch at a time (locks).
        self.pipeline = pipeline or (2 if getattr(backend, "overlaps_encode", False) else 1)
        if self.pipeline not in (1, 2):
            raise ValueError(f"pipeline must be 1 or 2 batches in flight, got {self.pipeline}")
        self._last_batch_requests = 0  # requests in the batch taken last (the low-load test of _next_batch)
        self._encode_lock = threading.Lock()
        self._search_lock = threading.Lock()
        self._inflight: set[asyncio.Task] = set()

    def start(self) -> None:
        """Start the batching task on the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._queue, self._queued = asyncio.Queue(), 0
            self._executor = ThreadPoolExecutor(max_workers=self.pipeline, thread_name_prefix="retrieval-worker")
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for t in list(self._inflight):  # batches still computing: their requests fail below
            t.cancel()
        while self._queue is not None and not self._queue.empty():
            self._queue.get_nowait()
        self._active, self._pending, self._queued = [], 0, 0
        for job in list(self._unresolved):
            if not job.future.done():
                job.future.set_exception(RuntimeError("retriever is shutting down"))
        self._unresolved.clear()
        if self._executor is not None:
            # Do not block the event loop on a batch still computing: shutdown must stay bounded.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, queries: list[str], topk: int, return_scores: bool) -> list[list[dict]]:
        job = self.enqueue(queries, topk, return_scores)
        return await job.future

    def enqueue(
        self, queries: list[str], topk: int, return_scores: bool, token_ids: list[list[int]] | None = None
    ) -> _Job:
        """Queue a request; its ``future`` gets the hits. Cancelling the future drops the request.

        ``token_ids``: the queries as the encoder's ``query_token_ids`` tokenizes them (the multi-process
        server's front ends do this, so the worker's time goes to the GPU); used when every query of a
        batch has them."""
        if token_ids is not None and len(token_ids) != len(queries):
            raise ValueError(f"{len(token_ids)} token id lists for {len(queries)} queries")
        if self._task is None or self._task.done():
            self.start()
        job = _Job(queries, topk, return_scores, asyncio.get_running_loop().create_future(), token_ids=token_ids)
        self._unresolved.add(job)
        job.future.add_done_callback(lambda _f, job=job: self._unresolved.discard(job))
        self._queue.put_nowait(job)
        self._queued += len(queries)
        if self._filled is not None and self._waiting() >= self.max_batch_size:
            self._filled.set()
        return job

    def stats(self) -> dict:
        return {
            "enabled": self.batching,
            "max_batch_size": self.max_batch_size,
            "max_batch_chars": self.max_batch_chars,
            "max_wait_ms": self.max_wait_s * 1000.0,
            "batches": self.batches,
            "requests": self.requests,
            "queries": self.queries,
            "split_requests": self.split_requests,
            "mean_batch_queries": (self.queries / self.batches) if self.batches else 0.0,
            "max_batch_queries": self.max_batch_seen,
            "busy_s": round(self.busy_s, 3),
            "encode_s": round(self.encode_s, 3),
            "search_s": round(self.search_s, 3),
            "lookup_s": round(self.lookup_s, 3),
            "unique_queries": self.unique_queries,
            "pretokenized_queries": self.pretokenized_queries,
            "queued": (self._queue.qsize() if self._queue is not None else 0) + len(self._active),
        }

    def _admit(self) -> None:
        """Move queued jobs to the active list (dropping those whose client already left)."""
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._queued -= len(job.queries)
            if not job.future.done():
                self._active.append(job)
                self._pending += len(job.queries)

    def _prune(self) -> None:
        """Drop active jobs that are fully sent or whose future is done (client gone, failed)."""
        keep = []
        for job in self._active:
            if job.sent < len(job.queries) and not job.future.done():
                keep.append(job)
            else:
                self._pending -= len(job.queries) - job.sent
        self._active = keep

    def _take(self) -> list[_Slice]:
        """The next batch: whole oldest job without batching, else round-robin slices of all jobs."""
        if not self.batching:
            job = self._active.pop(0)
            self._pending -= len(job.queries) - job.sent
            slices = [(job, job.sent, len(job.queries))]
        else:
            jobs = self._active
            counts = [0] * len(jobs)
            n = chars = 0
            full = False
            while not full:
                progressed = False
                for i, job in enumerate(jobs):
                    j = job.sent + counts[i]
                    if j >= len(job.queries):
                        continue
                    c = len(job.queries[j])
                    if n and chars + c > self.max_batch_chars:  # a batch always takes at least one query
                        full = True
                        break
                    counts[i] += 1
                    n += 1
                    chars += c
                    progressed = True
                    if n >= self.max_batch_size:
                        full = True
                        break
                if not progressed:
                    break
            slices = [(job, job.sent, job.sent + c) for job, c in zip(jobs, counts) if c]
        for job, lo, hi in slices:
            if lo == 0:
                self.requests += 1
                if hi < len(job.queries):
                    self.split_requests += 1
            job.sent = hi
            if self.batching:
                self._pending -= hi - lo
        if self.batching:
            self._prune()
        self._last_batch_requests = len(slices)
        return slices

    async def _next_batch(self) -> list[_Slice]:
        """Wait for work, then gather more within the size and time limits."""
        while True:
            self._admit()
            self._prune()
            if self._active:
                break
            job = await self._queue.get()
            self._queued -= len(job.queries)
            if not job.future.done():
                self._active.append(job)
                self._pending += len(job.queries)
        # Wait for more queries only under load (the last batch held several requests): a lone client
        # would otherwise pay max_wait_ms on every request for nothing. The wait ends as soon as
        # max_batch_size queries wait: the clients answered by the last batch come back within a few
        # ms, and a full batch costs little more than a half one on a GPU.
        if (
            self.batching
            and self.max_wait_s > 0
            and self._last_batch_requests > 1
            and self._waiting() < self.max_batch_size
        ):
            self._filled = asyncio.Event()
            try:
                await asyncio.wait_for(self._filled.wait(), self.max_wait_s)
            except TimeoutError:
                pass
            finally:
                self._filled = None
            self._admit()
            self._prune()
            if not self._active:  # every waiting client left during the wait
                return []
        return self._take()

    def _waiting(self) -> int:
        """Queries waiting for a batch: admitted and not yet sent, plus those still in the queue."""
        return self._pending + self._queued

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.pipeline)  # batches in flight at once
        while True:
            await slots.acquire()
            batch = [s for s in await self._next_batch() if not s[0].future.done()]
            if not batch:
                slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._complete(batch, slots))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _complete(self, batch: list[_Slice], slots: asyncio.Semaphore) -> None:
        """Compute one batch in the executor, answer its slices, free its pipeline slot."""
        try:
            t0 = time.perf_counter()
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, self._process, batch)
            except Exception as e:  # a server fault: fail this batch's requests (HTTP 500), keep serving
                for job, _, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            else:
                for (job, lo, hi), hits in zip(batch, results):
                    if job.future.done():  # client left while its slice computed
                        continue
                    if lo == 0 and hi == len(job.queries):
                        job.future.set_result(hits)
                        continue
                    if job.results is None:
                        job.results = [None] * len(job.queries)
                    job.results[lo:hi] = hits
                    job.answered += hi - lo
                    if job.answered == len(job.queries):
                        job.future.set_result(job.results)
            self.busy_s += time.perf_counter() - t0
            n = sum(hi - lo for _, lo, hi in batch)
            self.batches += 1
            self.queries += n
            self.max_batch_seen = max(self.max_batch_seen, n)
        finally:
            slots.release()

    def _process(self, batch: list[_Slice]) -> list[list[list[dict]]]:
        texts = [q for job, lo, hi in batch for q in job.queries[lo:hi]]
        # GRPO's samples of one prompt often issue the same search: encode and search each distinct
        # text once per batch (exact: the same text gives the same embedding and hits).
        row_of: dict[str, int] = {}
        rows = [row_of.setdefault(t, len(row_of)) for t in texts]
        ids_of: dict[str, list[int]] | None = {}
        for job, lo, hi in batch:
            if job.token_ids is None:
                ids_of = None
                break
            for text, ids in zip(job.queries[lo:hi], job.token_ids[lo:hi]):
                ids_of.setdefault(text, ids)
        with self._encode_lock:
            t0 = time.perf_counter()
            if ids_of is not None:
                emb = self.encoder.encode_query_ids([ids_of[t] for t in row_of])
            else:
                emb = self.encoder.encode_queries(list(row_of))
            self.encode_s += time.perf_counter() - t0
        k = max(job.topk for job, _, _ in batch)
        with self._search_lock:
            t1 = time.perf_counter()  # after any wait for the other batch's search
            scores, ids = self.backend.search(np.asarray(emb, dtype=np.float32), k)
            t2 = time.perf_counter()
            self.search_s += t2 - t1
        scores, ids = scores.tolist(), ids.tolist()  # Python scalars: cheaper per element than numpy's
        out, i = [], 0
        if self.corpus is None:  # raw hits for a front end: [scores, ids] per query, no lookups
            for job, lo, hi in batch:
                per_job = []
                for r in rows[i : i + hi - lo]:
                    k = job.topk
                    s_row, i_row = scores[r][:k], ids[r][:k]
                    if i_row and i_row[-1] < 0:  # fewer passages than k
                        keep = [j for j, d in enumerate(i_row) if d >= 0]
                        s_row, i_row = [s_row[j] for j in keep], [i_row[j] for j in keep]
                    per_job.append([s_row, i_row])
                i += hi - lo
                out.append(per_job)
        else:
            docs: dict[int, dict] = {}
            for job, lo, hi in batch:
                out.append(
                    [
                        hits_for(self.corpus, scores[r], ids[r], job.topk, job.return_scores, docs)
                        for r in rows[i : i + hi - lo]
                    ]
                )
                i += hi - lo
        with self._search_lock:  # counters shared by the pipeline's threads
            self.lookup_s += time.perf_counter() - t2
            self.unique_queries += len(row_of)
            if ids_of is not None:
                self.pretokenized_queries += len(row_of)
        return out


def hits_for(corpus: Any, scores: list[float], ids: list[int], topk: int, return_scores: bool, docs: dict) -> list:
    """One query's hits in Search-R1's shape: the corpus rows, or ``{"document", "score"}`` with scores.

    ``docs`` caches rows by id across the queries of one batch; ids < 0 (fewer passages than k) are skipped.
    """
    hits = []
    for score, doc_id in zip(scores[:topk], ids[:topk]):
        if doc_id < 0:
            continue
        doc = docs.get(doc_id)
        if doc is None:
            doc = docs[doc_id] = corpus.get(doc_id)
        hits.append({"document": doc, "score": score} if return_scores else doc)
    return hits


@dataclass(frozen=True)
class Limits:
    """What one /retrieve request may ask for (422 beyond; 413 for the body). ``topk_max`` and ``default_topk``
    (the topk of a request that names none; Search-R1's server uses its --topk) are the config's
    retriever.topk_max and retriever.topk, so they have no default here; the other three are the server's own
    limits (``serve`` flags)."""

    topk_max: int
    default_topk: int
    max_queries: int = 1024
    max_query_chars: int = 4096
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class HttpLimits:
    """Connection-level limits and timeouts; the CLI's ``serve`` flags take their defaults from here."""

    max_header_bytes: int = 16384  # request line + header fields, raw bytes (431 beyond)
    max_headers: int = 100  # header fields per request (431 beyond)
    keep_alive_timeout_s: float = 5.0  # a connection with no request in progress is closed after this
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its headers (408)
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body (408)
    shutdown_grace_s: float = 5.0  # SIGTERM/SIGINT: in-flight requests get this long, then exit

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value} (--{name.replace('_', '-')})")


@dataclass
class ClientCounters:
    """What hostile or departing clients did; reported under ``clients`` in ``/health``."""

    disconnects: int = 0  # left before their answer (mid-body, or while it was computed)
    header_too_large: int = 0  # 431: too many or too large header fields
    header_timeouts: int = 0  # 408: headers not finished in time
    body_timeouts: int = 0  # 408: body not finished in time
    idle_closed: int = 0  # connections closed for sending nothing within keep_alive_timeout_s

    def as_dict(self) -> dict:
        return asdict(self)


class _ClientGone(Exception):
    """The client disconnected before its answer; nothing can be sent."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_retrieve_request(body: bytes, limits: Limits) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body; return (queries, topk, return_scores) or raise ClientError."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:  # also invalid UTF-8
        raise ClientError(400, f"malformed JSON body: {e}") from None
    if not isinstance(payload, dict):
        raise ClientError(422, f"body must be a JSON object, got {_type_name(payload)}")
    if "queries" not in payload:
        raise ClientError(422, "missing field 'queries' (a list of query strings)")
    queries = payload["queries"]
    if not isinstance(queries, list):
        raise ClientError(422, f"'queries' must be a list of strings, got {_type_name(queries)}")
    if not queries:
        raise ClientError(422, "'queries' must not be empty")
    if len(queries) > limits.max_queries:
        raise ClientError(422, f"'queries' has {len(queries)} items, more than max_queries={limits.max_queries}")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise ClientError(422, f"queries[{i}] must be a string, got {_type_name(q)}")
        if not q.strip():
            raise ClientError(422, f"queries[{i}] is empty")
        if len(q) > limits.max_query_chars:
            raise ClientError(
                422, f"queries[{i}] has {len(q)} characters, more than max_query_chars={limits.max_query_chars}"
            )
    topk = payload.get("topk", limits.default_topk)
    if topk is None:
        topk = limits.default_topk
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ClientError(422, f"'topk' must be an integer, got {_type_name(topk)}")
    if topk <= 0:
        raise ClientError(422, f"'topk' must be positive, got {topk}")
    if topk > limits.topk_max:
        raise ClientError(422, f"'topk' is {topk}, more than topk_max={limits.topk_max}")
    return_scores = payload.get("return_scores", False)
    if return_scores is None:
        return_scores = False
    if not isinstance(return_scores, bool):
        raise ClientError(422, f"'return_scores' must be a boolean, got {_type_name(return_scores)}")
    return queries, topk, return_scores


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, within ``max_bytes`` (413) and ``timeout_s`` (408); _ClientGone if the client left."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise ClientError(400, f"invalid Content-Length header: {declared!r}") from None
        if declared_n > max_bytes:
            raise ClientError(413, f"body of {declared_n} bytes is larger than max_body_bytes={max_bytes}")
    try:
        return await _within(_collect_body(request.receive, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise ClientError(
            408, f"request body not received within body_timeout_s={timeout_s:g} (--body-timeout-s)"
        ) from None


async def _collect_body(receive: Any, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # also what a malformed chunked body turns into
            raise _ClientGone("client disconnected while sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:  # also bounds bodies sent without a Content-Length
            raise ClientError(413, f"body is larger than max_body_bytes={max_bytes}")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _within(coro: Any, timeout_s: float) -> Any:
    if sys.version_info >= (3, 11):  # a timer on the current task, no extra task per request
        async with asyncio.timeout(timeout_s):
            return await coro
    return await asyncio.wait_for(coro, timeout_s)


def _json_response(payload: Any, status_code: int = 200) -> Response:
    # orjson: several times faster than json.dumps for the passage lists; non-ASCII stays UTF-8.
    return Response(orjson.dumps(payload), status_code=status_code, media_type="application/json")


# Every status /retrieve answers, and why (the served OpenAPI schema lists them; a test checks it against the
# server's answers). 431 and the header 408 come from the connection layer (guarded_protocol), with the same body.
RETRIEVE_ERRORS = {
    400: "malformed JSON body or Content-Length header",
    408: "headers not complete within header_timeout_s, or body within body_timeout_s (the connection is closed)",
    413: "body larger than max_body_bytes",
    415: "Content-Type is not application/json",
    422: "the body is JSON but not a valid request: `detail` names the field and the limit it breaks "
    "(queries missing, empty, over maxItems or a query over maxLength; topk not an integer in [1, maximum]; "
    "return_scores not a boolean)",
    431: "request line and headers over max_header_bytes, or more than max_headers header fields",
}


def _retrieve_openapi(limits: Limits) -> dict:
    """/retrieve's request body, answers and limits as OpenAPI (the handler parses raw bytes, so FastAPI cannot
    derive them): the limits of this server are the schema's constraints (maxItems, maxLength, maximum)."""
    query = {"type": "string", "minLength": 1, "maxLength": limits.max_query_chars, "pattern": r"\S"}
    body = {
        "type": "object",
        "required": ["queries"],
        "properties": {
            "queries": {"type": "array", "minItems": 1, "maxItems": limits.max_queries, "items": query},
            "topk": {"type": "integer", "minimum": 1, "maximum": limits.topk_max, "default": limits.default_topk},
            "return_scores": {"type": "boolean", "default": False},
        },
    }
    passage = {"type": "object", "required": ["contents"], "properties": {"contents": {"type": "string"}}}
    scored = {
        "type": "object",
        "required": ["document", "score"],
        "properties": {"document": passage, "score": {"type": "number"}},
    }
    result = {
        "type": "object",
        "required": ["result"],
        "properties": {
            "result": {
                "type": "array",
                "description": "one list of at most topk hits per query, best first",
                "items": {"type": "array", "items": {"anyOf": [passage, scored]}},
            }
        },
    }
    detail = {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}
    errors = {
        str(status): {"description": why, "content": {"application/json": {"schema": detail}}}
        for status, why in RETRIEVE_ERRORS.items()
    }
    return {
        "description": f"A request body of at most {limits.max_body_bytes} bytes (413 beyond).",
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": {
                "description": "`result`: one list of hits per query (corpus rows; {document, score} with "
                "return_scores)",
                "content": {"application/json": {"schema": result}},
            },
            **errors,
            "500": {
                "description": "a server fault (encoder, index or corpus): this request fails, the server keeps "
                "serving",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        },
    }


def create_app(
    corpus: CorpusStore,
    encoder: TextEncoder,
    backend: SearchBackend,
    *,
    topk_max: int,
    default_topk: int,
    max_batch_size: int,
    max_wait_ms: float,
    max_queries: int = Limits.max_queries,
    max_query_chars: int = Limits.max_query_chars,
    max_body_bytes: int = Limits.max_body_bytes,
    batching: bool = True,
    max_batch_chars: int = DEFAULT_MAX_BATCH_CHARS,
    http_limits: HttpLimits | None = None,
    pipeline: int | None = None,
) -> FastAPI:
    """The FastAPI app serving ``POST /retrieve`` and ``GET|HEAD /health`` over one corpus/encoder/backend.

    ``topk_max``, ``default_topk``, ``max_batch_size`` and ``max_wait_ms`` are the config's retriever.topk_max,
    retriever.topk, retriever.max_batch_size and retriever.max_wait_ms (``serve``'s flags default to them).

    ``http_limits`` (default ``HttpLimits()``) are stored on ``app.state`` for ``serve_app``, which
    applies the connection-level ones; the body timeout is applied here.
    """
    if len(corpus) != backend.ntotal:
        raise ValueError(f"corpus {corpus.path} has {len(corpus)} rows but the index has {backend.ntotal} vectors")
    worker = BatchingWorker(
        corpus,
        encoder,
        backend,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        batching=batching,
        max_batch_chars=max_batch_chars,
        pipeline=pipeline,
    )
    return build_app(
        worker,
        index_info(corpus, encoder, backend),
        Limits(
            topk_max=topk_max,
            default_topk=default_topk,
            max_queries=max_queries,
            max_query_chars=max_query_chars,
            max_body_bytes=max_body_bytes,
        ),
        http_limits,
    )


def index_info(corpus: Any, encoder: Any, backend: Any) -> dict:
    """What /health says about the data: passages, dim, backend and encoder names."""
    return {
        "passages": len(corpus),
        "dim": backend.dim,
        "backend": backend.name,
        "encoder": getattr(encoder, "name", type(encoder).__name__),
    }


def build_app(worker: Any, info: dict, limits: Limits, http_limits: HttpLimits | None = None) -> FastAPI:
    """The app over any worker with BatchingWorker's interface (``start``, ``stop``, ``enqueue``, ``stats``).

    In-process that is a ``BatchingWorker``; in an HTTP front end of the multi-process server it is a
    ``frontends.RemoteWorker``, whose ``remote_health()`` adds the GPU worker's view to /health.
    """
    http_limits = http_limits or HttpLimits()
    counters = ClientCounters()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = worker.start()
        if started is not None:  # a remote worker connects asynchronously
            await started
        yield
        await worker.stop()

    app = FastAPI(title="searchr1 retriever", lifespan=lifespan)
    app.state.worker = worker
    app.state.limits = limits
    app.state.http_limits = http_limits
    app.state.counters = counters
    started = time.time()

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> Response:
        response = _json_response({"detail": exc.message}, status_code=exc.status)
        if exc.status == 408:  # a stalled body: the connection's framing is unknown, so close it
            counters.body_timeouts += 1
            response.headers["connection"] = "close"
        return response

    async def answer(request: Request, queries: list[str], topk: int, return_scores: bool) -> list:
        job = worker.enqueue(queries, topk, return_scores)
        # With the body read, the next ASGI message is the disconnect (or the end of our response):
        # a client that leaves while its queries wait or compute drops them from the worker.
        watch = asyncio.ensure_future(request.receive())

        def client_left(t: asyncio.Future) -> None:
            if not t.cancelled() and t.exception() is None and t.result()["type"] == "http.disconnect":
                if not job.future.done():
                    job.future.set_exception(_ClientGone("client disconnected while its answer was computed"))

        watch.add_done_callback(client_left)
        try:
            return await job.future
        finally:
            watch.cancel()

    # The handler takes the raw Request and returns bytes: no pydantic model or response
    # validation per request (it validates by hand, with messages that name the problem).
    @app.post("/retrieve", openapi_extra=_retrieve_openapi(limits))
    async def retrieve(request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ClientError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}")
        try:
            body = await _read_body(request, limits.max_body_bytes, http_limits.body_timeout_s)
            queries, topk, return_scores = parse_retrieve_request(body, limits)
            result = await answer(request, queries, topk, return_scores)
        except _ClientGone as e:  # an ordinary event: count it, nothing to send
            counters.disconnects += 1
            log.debug("%s (%s)", e, request.client)
            return Response(status_code=499)  # never sent; the connection is gone
        return _json_response({"result": result})

    @app.get("/health")
    async def health() -> dict:
        out = {
            "status": "ok",
            "pid": os.getpid(),
            **info,
            "uptime_s": round(time.time() - started, 1),
            "process_cpu_s": round(time.process_time(), 3),  # for benchmarks: the server's CPU cost
            # CPU of the event-loop thread alone (this handler runs on it): HTTP parsing, routing,
            # validation, JSON replies and batching bookkeeping; the rest is encoder/search threads.
            "loop_thread_cpu_s": round(time.thread_time(), 3),
            "batching": worker.stats(),
            "clients": counters.as_dict(),
            "http_limits": asdict(http_limits),
        }
        remote = getattr(worker, "remote_health", None)
        if remote is not None:  # an HTTP front end: the worker process's pid, batching, all front ends' clients
            out.update(await remote(counters.as_dict()))
        return out

    # HEAD for load balancers and probes (uvicorn sends the headers of the GET answer, no body).
    app.add_api_route("/health", health, methods=["HEAD"], operation_id="health_head")
    return app


# --- serving: the listening socket, connection limits, bounded shutdown ---------------------------


class PortInUseError(OSError):
    """The server's port is taken (raised before anything heavy is loaded)."""


def bind_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket on host:port, or PortInUseError naming them.

    The CLI binds first and loads the encoder and the index afterwards, so a busy port fails in
    milliseconds, not after minutes of loading; the socket is then handed to uvicorn.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebinding after a restart (TIME_WAIT)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(e.errno, f"port {port} on {host} is already in use (--port {port})") from None
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(False)
    return sock


class RetrieverServer:
    """Runs an app on a bound socket with uvicorn; bounded shutdown whatever the clients do.

    First SIGTERM/SIGINT: uvicorn's graceful shutdown; connections still open after ``shutdown_grace_s``
    are closed (their handlers see an ordinary disconnect, so no task is cancelled mid-request); a
    watchdog thread hard-exits if the process still lives 1.5 s after that (and a SIGALRM backstop kills
    it even if the interpreter is stuck). Second signal: exit at once.
    The watchdog matters when the parent is SIGKILLed: its parent-death SIGTERM is all we get.
    """

    def __init__(self, app: FastAPI, sock: socket.socket, *, log_level: str = "info", signals: bool = True) -> None:
        """``signals=False`` (an HTTP front end of the multi-process server): SIGTERM/SIGINT are ignored,
        the process that started it calls ``shutdown()`` instead (it coordinates the whole group)."""
        import uvicorn

        limits: HttpLimits = app.state.http_limits
        self.limits = limits
        self.sock = sock
        self.protocol = guarded_protocol(limits, app.state.counters)
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            http=self.protocol,
            timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
            # A backstop only: _close_connections ends the stragglers first (uvicorn's timeout would
            # cancel their tasks, which it logs as application errors).
            timeout_graceful_shutdown=limits.shutdown_grace_s + 0.5,  # type: ignore[arg-type]
        )
        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if not signals:
                    log.debug("%s ignored: the server's main process stops this front end", signal.Signals(sig).name)
                    return
                outer._on_signal(sig)
                super().handle_exit(sig, frame)

        self.server = _Server(config)
        self._signals = 0

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def _on_signal(self, sig: int) -> None:
        self._begin_shutdown(signal.Signals(sig).name, 128 + sig)

    def shutdown(self, reason: str) -> None:
        """Graceful stop called on the event loop (a front end told by the main process); a second call
        exits at once, like a second signal."""
        self._begin_shutdown(reason, 1)
        self.server.should_exit = True

    def _begin_shutdown(self, name: str, second_exit_code: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal (%s): exiting now", name)
            _hard_exit(second_exit_code)
        grace = self.limits.shutdown_grace_s
        log.info("%s: shutting down (in-flight requests get %.1f s)", name, grace)
        threading.Thread(target=self._watchdog, args=(grace + 1.5,), name="shutdown-watchdog", daemon=True).start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # default action: the kernel ends the process
            signal.setitimer(signal.ITIMER_REAL, grace + 3.0)
        try:
            loop = asyncio.get_running_loop()  # signal handlers run on the loop's (main) thread
        except RuntimeError:
            return
        loop.call_soon_threadsafe(loop.call_later, grace, self._close_connections)

    def _close_connections(self) -> None:
        left = [c for c in self.protocol.open_connections if not c.transport.is_closing()]
        if left:
            log.info(
                "closing %d connection(s) still open after shutdown_grace_s=%.1f s",
                len(left),
                self.limits.shutdown_grace_s,
            )
        for conn in left:
            conn.transport.close()

    def _watchdog(self, after_s: float) -> None:
        time.sleep(after_s)
        log.error(
            "shutdown did not finish within shutdown_grace_s=%.1f s + 1.5 s: exiting hard", self.limits.shutdown_grace_s
        )
        _hard_exit(1)

    def request_exit(self) -> None:
        """Graceful stop from another thread (tests); signals do this in a process."""
        self.server.should_exit = True

    def run(self) -> None:
        """Serve until stopped. SIGINT ends in KeyboardInterrupt, caught here; SIGTERM in its default action."""
        try:
            self.server.run(sockets=[self.sock])
        except KeyboardInterrupt:
            pass


def _hard_exit(code: int) -> None:
    for h in logging.getLogger().handlers:  # os._exit skips the flush of buffered log output
        try:
            h.flush()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
