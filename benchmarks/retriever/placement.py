"""Where the retriever runs, measured at wiki-18 size: the figures of docs/placement.md.

On one GPU machine, from the checkout's root: ``python -m benchmarks.retriever.placement --out
benchmarks/retriever_placement.json``:

1. a synthetic wiki-18-shaped pair (21,015,324 random unit vectors x 768 in a faiss Flat IP file, a 21M-row
   corpus, an e5-base-shaped random encoder: nothing can be downloaded there) in a tmpfs;
2. CPU search in this process on every core: our CPU backend (``TorchBackend`` on the memory-mapped fp32
   vectors: batched matmul, faiss's scan for single queries) and faiss's exact flat inner-product kernel
   (``faiss.knn``, what ``IndexFlatIP.search`` runs), at the batch sizes our server forms;
3. the process layout of the train job, per placement: the real server started by
   ``searchr1.steps.retrieval.retriever`` with the GPUs ``place(cfg, "train")`` gives it, beside a stand-in
   for slime's GPU processes (a process holding SGLang's static share of the GPU, started with the GPU ids
   the Ray head would get), 256 single-query requests in flight, and every process's GPU memory from
   nvidia-smi: on ``cpu`` the retriever must hold none; on ``shared`` (one GPU: the layout of a dedicated
   retriever GPU too, which holds the same) what ``placement.shared_need`` plans;
4. the shared check against the real GPU: refused at the recipe's sglang_mem_fraction_static, allowed at a
   fraction that leaves room.

Every section is written to the JSON as soon as it is done (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from searchr1.fsutil import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]

FORMAT = "searchr1-placement-bench/1"
WIKI18_ROWS = 21_015_324
STANDIN = r"""
import sys, time, torch
x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print("ready", flush=True)
time.sleep(3600)
"""
LOADGEN = r"""
import json, sys
from benchmarks.retriever.loadgen import run_load_sync
from benchmarks.retriever.synthetic import synthetic_queries
url, conc, dur, seed, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = run_load_sync(url, synthetic_queries(200000, seed=seed), conc, duration_s=dur)
json.dump({"requests": r.requests, "errors": r.errors, "wall_s": r.wall_s, "lat": r.latencies_s}, open(out, "w"))
"""


def nvidia_apps() -> dict[int, float]:
    """pid -> GPU memory (MiB) of every process with a CUDA context, from nvidia-smi."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    apps = {}
    for line in out.strip().splitlines():
        pid, mem = (part.strip() for part in line.split(","))
        apps[int(pid)] = float(mem)
    return apps


def gpu_used_mib() -> list[float]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [[float(v) for v in line.split(",")] for line in out.strip().splitlines()]


def server_pid(port: int) -> int:
    """The retriever server's pid, found by its command line (``serve ... --port <port>``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "searchr1.retrieval" in args and "serve" in args and "--port" in args:
            if args[args.index("--port") + 1] == str(port):
                return int(entry.name)
    raise RuntimeError(f"no retriever server process on port {port}")


def proc_env(pid: int, name: str) -> str | None:
    for item in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
        key, _, value = item.decode(errors="replace").partition("=")
        if key == name:
            return value
    return None


def proc_rss_gb(pid: int) -> float:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1e6, 2)
    return 0.0


def timed(fn, reps: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "reps": reps}


def setup(work: Path, rows: int, dim: int) -> dict:
    from benchmarks.retriever.synthetic import make_e5_shaped_model, write_synthetic_corpus, write_synthetic_flat_index
    from searchr1.retrieval.corpus import build_offsets
    from searchr1.retrieval.index import write_index_meta

    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    index, corpus = work / "index.faiss", work / "corpus.jsonl"
    write_synthetic_flat_index(index, rows, dim, seed=0, use_gpu=True)
    write_synthetic_corpus(corpus, rows)
    build_offsets(corpus)
    write_index_meta(index, corpus, encoder={"name": "e5-base-shaped-random", "query_prefix": "query: "})
    encoder = make_e5_shaped_model(work)
    return {
        "inputs": {"index": str(index), "corpus": str(corpus), "encoder": str(encoder)},
        "setup_s": round(time.perf_counter() - t, 1),
        "index_bytes": index.stat().st_size,
    }


def cpu_search(index: Path, batches: list[int], k: int) -> dict:
    """Our CPU backend and faiss's exact flat IP kernel over the same memory-mapped fp32 vectors."""
    import faiss
    import torch

    from searchr1.retrieval.index import TorchBackend, open_flat_vectors

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    vectors = open_flat_vectors(index)
    t = time.perf_counter()
    np.asarray(vectors[:: 1 << 14]).sum()  # touch: the tmpfs pages are mapped before timing
    backend = TorchBackend(vectors, device="cpu")
    rng = np.random.default_rng(1)
    out = {"threads": threads, "backend": backend.name, "open_s": round(time.perf_counter() - t, 2), "ours": {}}
    for n in batches:
        q = rng.standard_normal((n, vectors.shape[1]), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        reps = 3 if n <= 2 else (2 if n <= 64 else 1)
        r = timed(lambda q=q: backend.search(q, k), reps)
        r["qps"] = round(n / r["median_s"], 1)
        out["ours"][str(n)] = r
        print(f"cpu ours batch {n}: {r}", flush=True)
    out["faiss_knn"] = {}
    for n in (1, 256):
        q = rng.standard_normal((n, vectors.shape[1]), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        r = timed(lambda q=q: faiss.knn(q, vectors, k, metric=faiss.METRIC_INNER_PRODUCT), 1 if n > 1 else 2)
        r["qps"] = round(n / r["median_s"], 1)
        out["faiss_knn"][str(n)] = r
        print(f"cpu faiss.knn batch {n}: {r}", flush=True)
    return out


def make_cfg(placement: str, *, sglang_fraction: float | None = None, rows: int = WIKI18_ROWS):
    """The recipe's config (config.yaml) on one GPU, with the given placement, as the train job declares it
    (``rows``: the index's passages, budget.corpus_passages, which the shared plan is computed from)."""
    from searchr1.config import load_config
    from searchr1.steps.settings import StepSettings, declare

    slime = {
        "gpus_per_node": 1,
        "rollout_num_gpus": 1,
        "tensor_model_parallel_size": 1,
        "rollout_num_gpus_per_engine": 1,
    }
    if sglang_fraction is not None:
        slime["sglang_mem_fraction_static"] = sglang_fraction
    over = {
        "retriever": {"placement": placement, "port": 0, "startup_timeout_s": 900},
        "train": {"backend": "slime", "slime": slime},
        "budget": {"corpus_passages": rows},
    }
    if placement != "dedicated":
        over["retriever"]["gpus"] = 0
    cfg = load_config(ROOT / "config.yaml", overrides=over)
    return StepSettings.from_params(declare(cfg, "retriever", "train", "eval", "budget", "agent"), step="train")


def load(url: str, procs: int, conc_each: int, duration_s: float, tmp: Path) -> dict:
    files = [tmp / f"load{i}.json" for i in range(procs)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "CUDA_VISIBLE_DEVICES": ""}
    ps = [
        subprocess.Popen([sys.executable, "-c", LOADGEN, url, str(conc_each), str(duration_s), str(i), str(f)], env=env)
        for i, f in enumerate(files)
    ]
    for p in ps:
        p.wait()
    lat, req, err, wall = [], 0, 0, 0.0
    for f in files:
        d = json.loads(f.read_text())
        lat += d["lat"]
        req += d["requests"]
        err += d["errors"]
        wall = max(wall, d["wall_s"])
    a = np.asarray(lat) if lat else np.zeros(1)
    return {
        "in_flight": procs * conc_each,
        "requests": req,
        "errors": err,
        "wall_s": round(wall, 2),
        "qps": round((req - err) / wall, 1) if wall else 0.0,
        "p50_ms": round(float(np.percentile(a, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(a, 99)) * 1000, 1),
    }


def layout(
    placement: str,
    inputs: dict,
    tmp: Path,
    *,
    standin_gb: float,
    load_s: float,
    procs: int,
    fraction: float | None = None,
    rows: int = WIKI18_ROWS,
) -> dict:
    """The train job's retriever beside a stand-in for slime's GPU processes; GPU memory per process."""
    import httpx

    from searchr1.retrieval import placement as pl
    from searchr1.steps.retrieval import place, retriever

    cfg = make_cfg(placement, sglang_fraction=fraction, rows=rows)
    out: dict = {"placement": placement, "describe": pl.describe(cfg, "train")}
    gpus = place(cfg, "train", env={})
    out["assignment"] = {"compute": gpus.compute, "retriever": gpus.retriever}
    before = nvidia_apps()
    standin = subprocess.Popen(
        [sys.executable, "-c", STANDIN, str(standin_gb)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus.compute)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert standin.stdout is not None and standin.stdout.readline().strip() == "ready"
        t = time.perf_counter()
        with retriever(cfg, inputs, tmp / f"{placement}.log", gpus=gpus.retriever) as url:
            out["server_start_s"] = round(time.perf_counter() - t, 1)
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            pid = server_pid(port)
            health = httpx.get(url.replace("/retrieve", "/health"), timeout=10).json()
            out["server"] = {
                "pid": pid,
                "CUDA_VISIBLE_DEVICES": proc_env(pid, "CUDA_VISIBLE_DEVICES"),
                "backend": health.get("backend") or health.get("index", {}).get("backend"),
                "health": {k: v for k, v in health.items() if k not in ("batching",)},
            }
            samples = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append({"t": time.time(), "apps": nvidia_apps(), "used_total_mib": gpu_used_mib()})
                    stop.wait(2.0)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                out["load"] = load(url, procs, 256 // procs, load_s, tmp)
            finally:
                stop.set()
                sampler.join()
            out["server"]["rss_gb"] = proc_rss_gb(pid)
            apps = [s["apps"] for s in samples]
            out["gpu_mib"] = {
                "retriever_max": max((a.get(pid, 0.0) for a in apps), default=0.0),
                "retriever_in_nvidia_smi": any(pid in a for a in apps),
                "standin_max": max((a.get(standin.pid, 0.0) for a in apps), default=0.0),
                "other_processes": sorted({p for a in apps for p in a} - {pid, standin.pid} - set(before)),
                "gpu_used_total_max": max((s["used_total_mib"][0][0] for s in samples), default=0.0),
                "gpu_total": samples[0]["used_total_mib"][0][1] if samples else None,
                "samples": len(samples),
            }
            if placement != "cpu":
                need = pl.shared_need(cfg, len(gpus.retriever))
                out["plan_mib"] = {k: round(v / 2**20, 1) for k, v in need.items()}
    finally:
        standin.terminate()
        standin.wait()
    print(f"layout {placement}: {json.dumps({k: v for k, v in out.items() if k != 'server'})}", flush=True)
    return out


def shared_checks(rows: int = WIKI18_ROWS) -> dict:
    """``place(cfg, 'train')`` under shared on this GPU: refused at the recipe's fraction, allowed at a lower one."""
    from searchr1.retrieval.placement import PlacementError
    from searchr1.steps.retrieval import place

    out = {}
    for fraction in (None, 0.4):
        cfg = make_cfg("shared", sglang_fraction=fraction, rows=rows)
        key = f"sglang_mem_fraction_static={cfg['train']['slime']['sglang_mem_fraction_static']}"
        try:
            place(cfg, "train", env={})
            out[key] = {"refused": False}
        except PlacementError as e:
            out[key] = {"refused": True, "message": str(e)}
    return out


def machine() -> dict:
    import torch

    info = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/dev/shm/placement")
    p.add_argument("--rows", type=int, default=WIKI18_ROWS)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 256])
    p.add_argument("--sections", nargs="+", default=["cpu_search", "layout_cpu", "shared_checks", "layout_shared"])
    p.add_argument("--cpu-load-s", type=float, default=30.0)
    p.add_argument("--gpu-load-s", type=float, default=15.0)
    a = p.parse_args(argv)
    report: dict = {
        "format": FORMAT,
        "what": __doc__.split("\n\n", 1)[0],
        "command": "python -m benchmarks.retriever.placement " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "data": {"rows": a.rows, "dim": a.dim, "k": a.k, "vectors": "random unit vectors (synthetic)"},
    }
    save = lambda: write_json_atomic(a.out, report)  # noqa: E731
    save()
    work = Path(a.work)
    report["setup"] = setup(work, a.rows, a.dim)
    save()
    inputs = report["setup"]["inputs"]
    for section in a.sections:
        t = time.perf_counter()
        try:
            if section == "cpu_search":
                report[section] = cpu_search(Path(inputs["index"]), a.batches, a.k)
            elif section == "layout_cpu":
                # the stand-in holds SGLang's static share (0.7 of the GPU) as slime's engines would
                report[section] = layout(
                    "cpu", inputs, work, standin_gb=0.7 * 79.0, load_s=a.cpu_load_s, procs=1, rows=a.rows
                )
            elif section == "shared_checks":
                report[section] = shared_checks(a.rows)
            elif section == "layout_shared":
                report[section] = layout(
                    "shared",
                    inputs,
                    work,
                    standin_gb=0.4 * 79.0,
                    load_s=a.gpu_load_s,
                    procs=4,
                    fraction=0.4,
                    rows=a.rows,
                )
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception as e:  # keep the other sections' figures; the error is part of the record
            report[section] = {"error": f"{type(e).__name__}: {e}"}
            print(f"section {section} failed: {e}", flush=True)
        report[section]["section_s"] = round(time.perf_counter() - t, 1)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
