"""The GPU search path of the torch backend (grouped top-k, candidate re-scoring, shard merge), run
with torch on the CPU at small sizes: the same code as on CUDA, minus streams and pinned memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchr1.retrieval.index import TorchBackend, merge_topk, topk_grouped


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.mark.parametrize("length", [1, 5, 127, 128, 1000, 4099])
@pytest.mark.parametrize("group", [1, 8, 128])
def test_topk_grouped_equals_topk_values(length: int, group: int) -> None:
    g = torch.Generator().manual_seed(length * 7 + group)
    scores = torch.randn(6, length, generator=g)
    for k in (1, 3, 19):
        vals, pos = topk_grouped(scores, k, group)
        want = torch.topk(scores, min(k, length), dim=1).values
        assert torch.equal(vals, want)
        assert torch.equal(scores.gather(1, pos), vals)  # positions point at those values
        assert all(len(set(r.tolist())) == r.numel() for r in pos)  # no position twice


def test_topk_grouped_with_ties_and_a_row_slice() -> None:
    # Many equal values (fp16-like plateaus) spread over several groups; a row-sliced view as input.
    base = torch.randint(0, 4, (5, 1000)).float()
    view = base[:, :997]
    vals, pos = topk_grouped(view, 10, 32)
    assert torch.equal(vals, torch.topk(view, 10, dim=1).values)
    assert torch.equal(view.gather(1, pos), vals)


def test_merge_topk() -> None:
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    i = torch.tensor([[10, 11, 12, 13]])
    top_s, top_i = merge_topk(s, i, 2)
    assert top_i.tolist() == [[11, 13]] and torch.allclose(top_s, torch.tensor([[0.9, 0.7]]))


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("chunk_rows,group", [(None, 128), (300, 16), (1000, 7), (64, 128)])
def test_grouped_search_is_exact(fp16: bool, chunk_rows: int | None, group: int) -> None:
    rng = np.random.default_rng(0)
    x, q = _unit(rng, 2500, 32), _unit(rng, 17, 32)
    be = TorchBackend(x, device="cpu", fp16=fp16, method="grouped", chunk_rows=chunk_rows, group=group)
    assert be.method == "grouped"
    got_s, got_i = be.search(q, 5)
    assert got_s.dtype == np.float32 and got_i.dtype == np.int64 and got_s.shape == (17, 5)
    stored = x.astype(np.float16).astype(np.float32) if fp16 else x
    want_s, want_i = _exact(stored, q, 5)
    # Scores are fp32 re-scores of the stored rows: equal to the exact ones to fp32 rounding; ids
    # equal up to ties (random data: no ties).
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    np.testing.assert_array_equal(got_i, want_i)


def test_grouped_search_merges_shards_and_clamps_k() -> None:
    rng = np.random.default_rng(1)
    x, q = _unit(rng, 900, 16), _unit(rng, 4, 16)
    shards = [torch.from_numpy(x[:400].copy()), torch.from_numpy(x[400:401].copy()), torch.from_numpy(x[401:].copy())]
    be = TorchBackend.from_shards(shards, fp16=False, chunk_rows=128, group=8, method="grouped")
    assert be.ntotal == 900 and be.dim == 16 and be.method == "grouped"
    got_s, got_i = be.search(q, 7)
    want_s, want_i = _exact(x, q, 7)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    # k above the number of rows: every row once, best first.
    small = TorchBackend(x[:3], device="cpu", fp16=False, method="grouped", group=2)
    s, i = small.search(q, 10)
    assert s.shape == (4, 3) and sorted(i[0].tolist()) == [0, 1, 2]


def test_plain_and_grouped_agree() -> None:
    rng = np.random.default_rng(2)
    x, q = _unit(rng, 3000, 24), _unit(rng, 9, 24)
    a = TorchBackend(x, device="cpu", fp16=False, method="plain", chunk_rows=500).search(q, 3)
    b = TorchBackend(x, device="cpu", fp16=False, method="grouped", chunk_rows=700, group=16).search(q, 3)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_cpu_default_stays_plain_and_bad_method_is_refused() -> None:
    x = _unit(np.random.default_rng(3), 10, 4)
    be = TorchBackend(x, device="cpu")
    assert be.method == "plain" and be.name == "torch-cpux1" and not be.overlaps_encode
    with pytest.raises(ValueError, match="method"):
        TorchBackend(x, device="cpu", method="fast")


# --- the one exactness check (benchmarks/retriever/exactness.py), which every GPU benchmark cell carries ----


def test_exactness_check_passes_the_backend_and_its_reference() -> None:
    from benchmarks.retriever.exactness import check_exact, check_reference_on_cpu

    rng = np.random.default_rng(4)
    x, q = _unit(rng, 3000, 32), _unit(rng, 16, 32)
    shards = [torch.from_numpy(x[:1700].copy()), torch.from_numpy(x[1700:].copy())]
    be = TorchBackend.from_shards(shards, fp16=True, chunk_rows=512, group=16, method="grouped")
    check = check_exact(be, shards, q, 5)
    assert check["ok"] and check["queries"] == 16 and check["k"] == 5
    # fp16 storage moves a score by ~1e-4 at d=32; the returned scores are fp32 re-scores of the stored rows
    assert check["max_rank_score_deficit"] <= check["tolerance"]
    assert check_reference_on_cpu(shards, q, 5)["ok"]


def test_exactness_check_fails_a_backend_that_misses_the_best_hit() -> None:
    """A backend that drops each query's best passage (returns ranks 2..k+1) is caught."""
    from benchmarks.retriever.exactness import check_exact

    rng = np.random.default_rng(5)
    x, q = _unit(rng, 2000, 32), _unit(rng, 8, 32)
    shards = [torch.from_numpy(x)]
    good = TorchBackend.from_shards(shards, fp16=False, method="grouped", group=16)

    class SkipsTheBest:
        def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            s, i = good.search(queries, k + 1)
            return s[:, 1:], i[:, 1:]

    check = check_exact(SkipsTheBest(), shards, q, 3)
    assert not check["ok"] and check["max_rank_score_deficit"] > check["tolerance"]


@pytest.mark.slow
def test_gpu_bench_runs_every_stage_on_the_cpu(tmp_path) -> None:
    """`python -m benchmarks.retriever.gpu --device-type cpu` at toy size: the code paths the H200 run takes
    (fp32 check, floors, variants, encoder, HTTP end to end with front-end processes, worker alone) and the
    report's shape, including a per-configuration batch wait (WORKERS:PIPELINE:WAIT)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "gpu.json"
    from helpers import ROOT

    cmd = [
        sys.executable,
        "-m",
        "benchmarks.retriever.gpu",
        "--device-type",
        "cpu",
        "--out",
        str(out),
        "--sizes",
        "5000",
        "--gpus",
        "1",
        "--reps",
        "2",
        "--batch",
        "8",
        "--check-queries",
        "8",
        "--cpu-check-queries",
        "4",
        "--variants",
        "65536:128",
        "--e2e-sizes",
        "5000",
        "--duration",
        "1",
        "--load-procs",
        "1",
        "--concurrency",
        "8",
        "--e2e-configs",
        "2:1",
        "2:1:7.5",
        "--encoder-layers",
        "1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    cell = json.loads(out.read_text())["results"]["1gpu"]["5000"]
    assert cell["check"]["ok"] and cell["reference_vs_cpu_fp32"]["ok"]
    assert set(cell["variants"]) == {"chunk65536_group128"}
    runs = cell["e2e_runs"]
    assert [(r["http_workers"], r["pipeline_batches_in_flight"]) for r in runs] == [(2, 1), (2, 1)]
    from searchr1.config import default_config

    assert [r["max_wait_ms"] for r in runs] == [default_config()["retriever"]["max_wait_ms"], 7.5]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in runs)
    assert "| 1 | 5,000 | 2 | 1 | 7.5 |" in run.stdout
    report = json.loads(out.read_text())
    assert report["targets"] == {"exact_topk_up_to_ties_all_cells": {"met": True}}  # the 21M targets need 21M cells
    assert list(report["machines"]) == [cell["machine"]]
