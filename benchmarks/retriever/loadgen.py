"""The benchmarks' load generator: N concurrent clients, each one keep-alive HTTP/1.1 connection sending one
query per request (slime's pattern), written with raw asyncio streams so the client costs tens of microseconds
per request, not the server's CPU.

``python -m benchmarks.retriever.loadgen URL CONCURRENCY WARMUP_S START_AT DURATION_S SEED OUT``: one load
process of the GPU benchmark's HTTP runs (warm up, wait for the common start time, run, write its counts and
latencies as JSON to OUT).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np

from benchmarks.retriever.synthetic import synthetic_queries


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    client_cpu_s: float
    results: list | None = field(default=None, repr=False)

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_s) if self.latencies_s else np.zeros(1)
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            # answered requests per second: a request that failed or timed out counts as nothing
            "qps": round((self.requests - self.errors) / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 2),
            "load_generator_cpu_s": round(self.client_cpu_s, 3),
        }


class _HTTPClientError(Exception):
    """A reply the load generator could not read as one HTTP/1.1 response."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response with a Content-Length body (what uvicorn sends for our replies)."""
    status_line = await reader.readline()
    if not status_line:
        raise _HTTPClientError("connection closed by the server")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise _HTTPClientError(f"bad status line {status_line[:80]!r}")
    status, length = int(parts[1]), None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise _HTTPClientError("response without Content-Length")
    return status, await reader.readexactly(length)


async def run_load(
    url: str,
    queries: list[str],
    concurrency: int,
    *,
    topk: int = 3,
    duration_s: float | None = None,
    keep_results: bool = False,
    timeout_s: float = 600.0,
    return_scores: bool = False,
) -> LoadResult:
    """Drive ``url`` with ``concurrency`` clients, each sending one query per request in turn.

    Each client is one keep-alive HTTP/1.1 connection written and read with raw asyncio streams:
    httpx costs ~1 ms of CPU per request, which on a 2-core machine starves the server it measures;
    this costs a few tens of microseconds. Without ``duration_s`` every query is sent exactly once
    (client c takes queries c, c+C, ...); with it, clients cycle through the queries until the
    deadline (requests in flight finish). A request counts as an error (never raised) unless the
    reply is a 200 whose body is a Search-R1 result; after a transport error the client reconnects.
    With ``keep_results`` the bodies are parsed and kept (for tests; the benchmark only checks the shape).
    """
    import orjson

    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise ValueError(f"load generator needs an http:// URL, got {url!r}")
    host, port, path = parsed.hostname, parsed.port or 80, parsed.path or "/"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    ).encode()
    results: list | None = [None] * len(queries) if keep_results else None
    latencies: list[float] = []
    errors = 0
    deadline = None if duration_s is None else time.perf_counter() + duration_s

    async def client(c: int) -> None:
        nonlocal errors
        reader = writer = None
        i = c
        try:
            while True:
                if deadline is None:
                    if i >= len(queries):
                        return
                elif time.perf_counter() >= deadline:
                    return
                body = orjson.dumps(
                    {"queries": [queries[i % len(queries)]], "topk": topk, "return_scores": return_scores}
                )
                t0 = time.perf_counter()
                hits = None
                try:
                    async with asyncio.timeout(timeout_s):
                        if writer is None:
                            reader, writer = await asyncio.open_connection(host, port)
                        writer.write(head % len(body) + body)
                        status, reply = await _read_response(reader)
                    ok = status == 200 and reply.startswith(b'{"result":[[')
                    if ok and results is not None:
                        hits = orjson.loads(reply)["result"][0]
                        if return_scores:
                            hits = [h["document"] for h in hits]
                except (OSError, EOFError, TimeoutError, ValueError, _HTTPClientError, asyncio.IncompleteReadError):
                    ok = False
                    if writer is not None:
                        writer.close()
                    reader = writer = None  # reconnect for the next request
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors += 1
                if results is not None and i < len(results):
                    results[i] = hits
                i += concurrency
        finally:
            if writer is not None:
                writer.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    wall = time.perf_counter() - t0
    return LoadResult(concurrency, len(latencies), errors, wall, latencies, time.process_time() - cpu0, results)


def run_load_sync(url: str, queries: list[str], concurrency: int, **kw) -> LoadResult:
    """``run_load`` on a fresh event loop (uvloop when installed: less client CPU)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_load(url, queries, concurrency, **kw))


def load_process(argv: list[str]) -> int:
    """One load-generator process of the GPU benchmark (see the module's docstring for ``argv``)."""
    url, conc, warm, start_at, dur, seed, out = argv
    qs = synthetic_queries(60000, seed=int(seed))
    run_load_sync(url, qs[-5000:], int(conc), duration_s=float(warm))
    while time.time() < float(start_at):
        time.sleep(0.005)
    r = run_load_sync(url, qs, int(conc), duration_s=float(dur))
    with open(out, "w") as f:
        json.dump(
            {
                "requests": r.requests,
                "errors": r.errors,
                "wall_s": r.wall_s,
                "lat": r.latencies_s,
                "cpu_s": r.client_cpu_s,
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(load_process(sys.argv[1:]))
