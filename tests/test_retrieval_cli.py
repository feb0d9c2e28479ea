"""The retriever CLI's download commands against the local hub-protocol server, and offsets/write-meta."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from hubserver import HubServer

from searchr1.retrieval.corpus import CorpusStore
from searchr1.retrieval.index import check_pair


def _cli(*commands: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m searchr1.retrieval ARGS` for each of ``commands`` in turn, in one fresh process (HF_ENDPOINT is
    read when huggingface_hub is imported; one process imports torch and the rest once): its exit status is the
    first nonzero one."""
    code = (
        "import sys; from searchr1.retrieval.__main__ import main; "
        f"sys.exit(next((rc for argv in {list(commands)!r} if (rc := main(argv))), 0))"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def hub_files() -> tuple[dict[str, bytes], dict[str, bytes], list[str]]:
    lines = [json.dumps({"id": str(i), "contents": f'"T{i}"\npassage {i}'}) for i in range(40)]
    corpus_gz = gzip.compress(("\n".join(lines) + "\n").encode())
    index = faiss.IndexFlatIP(8)
    index.add(np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    blob = faiss.serialize_index(index).tobytes()
    half = len(blob) // 2
    return {"wiki-18.jsonl.gz": corpus_gz}, {"part_aa": blob[:half], "part_ab": blob[half:]}, lines


def test_download_corpus_and_index_then_pair_checks(hub_files, tmp_path: Path) -> None:
    corpus_files, index_files, lines = hub_files
    with HubServer() as hub:
        hub.state.add("dataset", "PeterJinGo/wiki-18-corpus", corpus_files)
        hub.state.add("dataset", "PeterJinGo/wiki-18-e5-index", index_files)
        corpus = tmp_path / "data" / "corpus.jsonl"
        index = tmp_path / "data" / "e5_Flat.index"
        r = _cli(
            ["download-corpus", "--revision", "main", "--dest-dir", str(tmp_path / "dl"), "--out", str(corpus)],
            [
                "download-index",
                "--revision",
                "main",
                "--dest-dir",
                str(tmp_path / "dl"),
                "--out",
                str(index),
                "--corpus",
                str(corpus),
                "--delete-parts",
            ],
            env=hub.client_env(HF_HOME=str(tmp_path / "hf")),
        )
        assert r.returncode == 0, r.stderr
    store = CorpusStore(corpus, build_offsets_if_needed=False)  # offsets were built by the command
    assert len(store) == 40 and store.get(39) == json.loads(lines[39])
    meta = check_pair(index, corpus)
    assert meta["n"] == 40 and meta["encoder"]["name"] == "intfloat/e5-base-v2"
    assert faiss.read_index(str(index)).ntotal == 40
    assert not (tmp_path / "dl" / "part_aa").exists()


def test_offsets_and_write_meta_commands(tmp_path: Path) -> None:
    from searchr1.retrieval.__main__ import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": "x"}) + "\n" for i in range(5)))
    assert main(["offsets", str(corpus)]) == 0
    index = faiss.IndexFlatIP(4)
    index.add(np.ones((5, 4), dtype=np.float32))
    faiss.write_index(index, str(tmp_path / "i.index"))
    assert main(["write-meta", "--index", str(tmp_path / "i.index"), "--corpus", str(corpus)]) == 0
    assert check_pair(tmp_path / "i.index", corpus)["n"] == 5
