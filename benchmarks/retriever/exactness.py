"""The one exactness check of the GPU search path: a backend's top-k against an exact fp32 search.

Used by the GPU benchmark (every cell of ``benchmarks/retriever_gpu.json`` carries its ``check``) and by the
tests (tests/test_retrieval_gpu_backend.py runs it on the CPU, and shows it fails on a wrong backend).
"""

from __future__ import annotations

import numpy as np

WIKI18_ROWS = 21_015_324
# An exact-search hit counts as correct when its fp32 score (q . x over the fp32 vectors) is within
# TOL of the reference's score at the same rank. The fp16 copy of the vectors moves a score by
# ~1e-5 (std, unit vectors, d=768); TOL is ~10x that, far below the gap between distinct hits.
TOL = 2e-4


def fp32_reference(shards32: list, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact fp32 top-k (TF32 off) over the fp32 shards; ids global."""
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        all_s, all_i, lo = [], [], 0
        with torch.inference_mode():
            for x in shards32:
                q = torch.from_numpy(queries).to(x.device)
                for s in range(0, x.shape[0], 1 << 22):
                    sc = q @ x[s : s + (1 << 22)].T
                    v, i = torch.topk(sc, min(k, sc.shape[1]), dim=1)
                    all_s.append(v.cpu())
                    all_i.append(i.cpu() + lo + s)
                lo += x.shape[0]
        s_, i_ = torch.cat(all_s, 1), torch.cat(all_i, 1)
        v, w = torch.topk(s_, k, dim=1)
        return v.numpy(), i_.gather(1, w).numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _exact_scores(shards32: list, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """fp32 q . x[id] for every (query, id) pair, from the fp32 shards."""
    import torch

    bounds = np.cumsum([0] + [x.shape[0] for x in shards32])
    out = np.empty(ids.shape, dtype=np.float32)
    for d, x in enumerate(shards32):
        mask = (ids >= bounds[d]) & (ids < bounds[d + 1])
        if not mask.any():
            continue
        r, c = np.nonzero(mask)
        rows = x[torch.from_numpy(ids[r, c] - bounds[d]).to(x.device)].cpu().numpy()
        out[r, c] = np.einsum("ij,ij->i", rows.astype(np.float64), queries[r].astype(np.float64))
    return out


def check_exact(backend, shards32: list, queries: np.ndarray, k: int) -> dict:
    """The backend's top-k vs the fp32 reference, up to ties (see TOL)."""
    want_s, want_i = fp32_reference(shards32, queries, k)
    got_s, got_i = backend.search(queries, k)
    exact = _exact_scores(shards32, queries, got_i)  # the returned ids' true fp32 scores
    deficit = want_s - -np.sort(-exact, axis=1)  # >0: a returned hit worse than the reference's at that rank
    same_sets = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(got_i, want_i))
    return {
        "queries": len(queries),
        "k": k,
        "reference": "exact fp32 search of the fp32 vectors on the GPU (TF32 off)",
        "rule": "sorted fp32 scores of the returned ids >= the reference's at each rank - tolerance",
        "tolerance": TOL,
        "max_rank_score_deficit": float(max(deficit.max(), 0.0)),
        "max_returned_score_error": float(np.abs(got_s - exact).max()),
        "id_sets_equal": int(same_sets),
        "ok": bool(deficit.max() <= TOL and np.abs(got_s - exact).max() <= TOL),
    }


def check_reference_on_cpu(shards32: list, queries: np.ndarray, k: int) -> dict:
    """The GPU fp32 reference against a numpy fp32 search on the CPU (same vectors copied to the host)."""
    want_s, want_i = fp32_reference(shards32, queries, k)
    host = np.concatenate([x.cpu().numpy() for x in shards32])
    sc = queries @ host.T
    part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1)
    cpu_i = np.take_along_axis(part, order, 1)
    cpu_s = np.take_along_axis(sc, cpu_i, 1)
    return {
        "queries": len(queries),
        "ids_equal": int((cpu_i == want_i).all(axis=1).sum()),
        "max_score_diff": float(np.abs(cpu_s - want_s).max()),
        "ok": bool(np.abs(cpu_s - want_s).max() <= 1e-5),
    }
