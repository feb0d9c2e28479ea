"""retriever.placement on a real GPU: the train job's process layout (the real retriever server started by
``searchr1.steps.retrieval.retriever`` with the GPUs ``place`` gives it, beside a stand-in process holding GPU
memory as slime's would), with every process's GPU memory read from nvidia-smi.

Skipped where torch sees no CUDA GPU (CI, the development machines). It uses the layout code of
benchmarks/retriever/placement.py at 2M passages; that code ran at 21M on the lent H100 machine (figures in
benchmarks/retriever_placement.json and docs/placement.md), this file itself has not run there yet (no machine
could be started for it: docs/placement.md)."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or shutil.which("nvidia-smi") is None,
    reason="needs a CUDA GPU and nvidia-smi (run it on a GPU machine; docs/placement.md says it has not run there yet)",
)
ROWS = 2_000_000

from benchmarks.retriever import placement as bench  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    return bench.setup(tmp_path_factory.mktemp("pair"), ROWS, 768)["inputs"]


def test_a_cpu_retriever_holds_no_gpu_memory_beside_slimes_processes(pair, tmp_path):
    r = bench.layout("cpu", pair, tmp_path, standin_gb=4, load_s=3, procs=1, rows=ROWS)
    print(r)
    assert r["server"]["CUDA_VISIBLE_DEVICES"] == "" and r["server"]["backend"].startswith("torch-cpu")
    assert not r["gpu_mib"]["retriever_in_nvidia_smi"] and r["gpu_mib"]["retriever_max"] == 0
    assert r["gpu_mib"]["standin_max"] >= 4 * 1024 and r["gpu_mib"]["other_processes"] == []
    assert r["load"]["requests"] > 0 and r["load"]["errors"] == 0


def test_a_shared_retriever_holds_what_the_plan_says_where_it_says(pair, tmp_path):
    r = bench.layout("shared", pair, tmp_path, standin_gb=4, load_s=3, procs=2, fraction=0.4, rows=ROWS)
    print(r)
    assert r["assignment"] == {"compute": ["0"], "retriever": ["0"]}
    assert r["server"]["CUDA_VISIBLE_DEVICES"] == "0" and r["server"]["backend"] == "torch-cuda-fp16x1"
    plan = r["plan_mib"]
    # more than its fp16 shard, no more than the plan's shard + overhead + encoder
    assert plan["shard"] < r["gpu_mib"]["retriever_max"] <= plan["per_gpu"]
    assert r["gpu_mib"]["other_processes"] == []  # the HTTP front ends hold no CUDA context
    assert r["load"]["requests"] > 0 and r["load"]["errors"] == 0


def test_shared_at_wiki18_size_is_checked_against_this_gpu():
    """At wiki-18 size on one GPU the retriever needs 37.0 GB (32.3 GB fp16 index): refused beside SGLang's 0.7 on
    an 80 GB card, allowed at 0.4; the check reads the card's memory from nvidia-smi."""
    total = torch.cuda.get_device_properties(0).total_memory
    checks = bench.shared_checks()
    assert checks["sglang_mem_fraction_static=0.7"]["refused"] == (total < 100e9)
    if total < 100e9:
        assert "does not fit" in checks["sglang_mem_fraction_static=0.7"]["message"]
    assert not checks["sglang_mem_fraction_static=0.4"]["refused"]
