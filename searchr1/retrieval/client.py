"""Async client of the Search-R1 retriever API (POST /retrieve), with retries that never fail silently.

slime's client returns ``[]`` on any error, so a dead retriever turns into empty ``<information>``
blocks and training goes on unaware. This client retries transient failures (connection errors,
timeouts, HTTP 5xx) with exponential backoff and then raises ``RetrievalError``; client mistakes
(HTTP 4xx) are raised at once with the server's message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx

logger = logging.getLogger(__name__)

# An idle pooled connection is dropped after this long, before a server's own keep-alive timeout (ours and
# uvicorn's: 5 s) closes it: a request sent on a connection the server is closing at that moment fails with
# a ReadError (seen in the toy's training job after its ~5 s learning-curve pauses: retries and backoff).
KEEPALIVE_EXPIRY_S = 2.0


def _zero_stats() -> dict:
    return {"requests": 0, "retries": 0, "failures": 0}


class RetrievalError(RuntimeError):
    """The retriever could not answer (after retries), or answered something unusable."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _hit_row(hit: Any, where: str) -> dict:
    # return_scores=false gives the corpus row itself; accept the scored shape {"document", "score"} too.
    if isinstance(hit, dict) and isinstance(hit.get("document"), dict):
        hit = hit["document"]
    if not isinstance(hit, dict) or not isinstance(hit.get("contents"), str):
        raise RetrievalError(f"{where}: a hit has no 'contents' string: {str(hit)[:200]}")
    return hit


class RetrievalClient:
    """Sends ``{"queries": [...], "topk": k, "return_scores": false}`` to ``url`` (the full /retrieve URL).

    ``batch=False`` (default) sends one query per request, slime's pattern: many small requests in
    flight, which our server merges into micro-batches anyway, and one slow or failing query does not
    hold up the others. ``batch=True`` sends all queries of one ``search()`` call in a single request:
    fewer round trips, the better choice for a turn-synchronous caller with a remote retriever.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_retries: int,
        backoff_s: float = 0.5,
        concurrency: int = 256,
        batch: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = url
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = concurrency
        self.batch = batch
        self._semaphore = asyncio.Semaphore(concurrency)
        self._client: httpx.AsyncClient | None = None
        self._stats = _zero_stats()

    @property
    def stats(self) -> dict:
        """Counters: HTTP requests sent, retries among them, requests that failed for good."""
        return dict(self._stats)

    def _http(self) -> httpx.AsyncClient:
        # Created lazily so the pool belongs to the event loop that uses it.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(
                    max_connections=self.concurrency,
                    max_keepalive_connections=self.concurrency,
                    keepalive_expiry=KEEPALIVE_EXPIRY_S,
                ),
                trust_env=False,  # a local service: never through a proxy
            )
        return self._client

    async def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        """Top-``topk`` corpus rows ``{"id", "contents"}`` for each query, in query order."""
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not a string")
        if not queries:
            return []
        if self.batch:
            return await self._request(list(queries), topk)
        per_query = await asyncio.gather(*(self._request([q], topk) for q in queries))
        return [hits[0] for hits in per_query]

    async def _request(self, queries: list[str], topk: int) -> list[list[dict]]:
        payload = {"queries": queries, "topk": topk, "return_scores": False}
        async with self._semaphore:
            for attempt in range(self.max_retries + 1):
                self._stats["requests"] += 1
                if attempt:
                    self._stats["retries"] += 1
                try:
                    response = await self._http().post(self.url, json=payload)
                except httpx.HTTPError as exc:  # connection refused/reset, timeouts, protocol errors
                    error = RetrievalError(f"retriever {self.url} unreachable: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                else:
                    if response.status_code < 400:
                        return self._parse(response, len(queries))
                    error = RetrievalError(
                        f"retriever {self.url} answered HTTP {response.status_code}: {response.text[:500]}",
                        status_code=response.status_code,
                    )
                    if response.status_code < 500:
                        self._stats["failures"] += 1
                        raise error
                if attempt < self.max_retries:
                    logger.warning("retrieval failed (%s); retry %d/%d", error, attempt + 1, self.max_retries)
                    await asyncio.sleep(self.backoff_s * 2**attempt)
            self._stats["failures"] += 1
            raise RetrievalError(
                f"{error} (gave up after {self.max_retries + 1} attempts)", status_code=error.status_code
            ) from error.__cause__

    def _parse(self, response: httpx.Response, n_queries: int) -> list[list[dict]]:
        try:
            body = response.json()
        except ValueError as exc:
            self._stats["failures"] += 1
            raise RetrievalError(f"retriever {self.url} answered non-JSON: {response.text[:200]}") from exc
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != n_queries:
            self._stats["failures"] += 1
            raise RetrievalError(
                f"retriever {self.url} answered {str(body)[:200]}; expected 'result' with {n_queries} hit lists"
            )
        try:
            for hits in result:
                if not isinstance(hits, list):
                    raise RetrievalError(f"retriever {self.url}: a hit list is not a list: {str(hits)[:200]}")
            return [[_hit_row(hit, f"retriever {self.url}") for hit in hits] for hits in result]
        except RetrievalError:
            self._stats["failures"] += 1
            raise

    async def health(self) -> dict:
        """GET the server's /health (next to /retrieve); raise RetrievalError if it is not up."""
        health_url = self.url.rsplit("/", 1)[0] + "/health"
        try:
            response = await self._http().get(health_url)
            response.raise_for_status()
            return response.json()
        except httpx.HTTPError as exc:
            raise RetrievalError(f"retriever health check {health_url} failed: {exc}") from exc

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> RetrievalClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class StartOnFirstSearch:
    """A retriever that is started only when the first search comes, then serves as a ``RetrievalClient``.

    ``start()`` brings a retriever up and returns its /retrieve URL (it blocks, on the event loop's own
    thread: a managed server installs its signal handling there); ``make_client(url)`` builds the client.
    An evaluation whose model never searches (a base model often never does) then never pays the server's
    start, and its results are the same as with a server started beforehand.
    """

    def __init__(self, start: Callable[[], str], make_client: Callable[[str], RetrievalClient]) -> None:
        self._start = start
        self._make_client = make_client
        self._client: RetrievalClient | None = None
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str | None:
        """The retriever's URL once started, else None."""
        return self._client.url if self._client is not None else None

    @property
    def stats(self) -> dict:
        return self._client.stats if self._client is not None else _zero_stats()

    async def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not a string")
        if self._client is None and queries:
            async with self._lock:
                if self._client is None:
                    self._client = self._make_client(self._start())
        if self._client is None:  # no queries: nothing to start for
            return []
        return await self._client.search(queries, topk)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
