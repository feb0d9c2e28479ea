"""The runner of Search-R1's own server (benchmarks/retriever/peer.py) and the benchmark's synthetic corpus.

Search-R1's source is not part of this project, so a stand-in checkout holds a
``search_r1/search/retrieval_server.py`` with what the runner must change in the real one: a model put on
``.cuda()`` and ``.half()``, and ``uvicorn.run(app, host="0.0.0.0", port=8000)`` in its ``__main__``.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from benchmarks.retriever.peer import PeerSourceError, managed_peer, peer_command
from benchmarks.retriever.synthetic import write_synthetic_corpus
from searchr1.retrieval.corpus import CorpusStore

STANDIN = """
import argparse, sys
import torch, uvicorn
from fastapi import FastAPI

parser = argparse.ArgumentParser()
for flag in ("--index_path", "--corpus_path", "--topk", "--retriever_name", "--retriever_model"):
    parser.add_argument(flag)
args = parser.parse_args()
model = torch.nn.Linear(2, 2)
model.cuda()
model = model.half()
x = torch.ones(1, 2).cuda()
app = FastAPI()

@app.post("/retrieve")
def retrieve():
    p = next(model.parameters())
    return {"device": str(p.device), "dtype": str(p.dtype), "input": str(x.device), "argv": sys.argv[1:],
            "name": args.retriever_name, "topk": args.topk}

if __name__ == "__main__":
    uvicorn.run(app, host="0.0.0.0", port=8000)
"""


def test_runner_keeps_the_peer_on_cpu_fp32_and_loopback(tmp_path: Path) -> None:
    src = tmp_path / "Search-R1"
    (src / "search_r1" / "search").mkdir(parents=True)
    (src / "search_r1" / "search" / "retrieval_server.py").write_text(STANDIN)
    with managed_peer(
        src,
        index="/i.faiss",
        corpus="/c.jsonl",
        encoder="/m",
        retriever_name="e5",
        log_path=tmp_path / "peer.log",
        startup_timeout_s=120,
    ) as url:
        assert url.startswith("http://127.0.0.1:") and not url.startswith("http://127.0.0.1:8000/")
        info = httpx.post(url, timeout=10).json()
    assert info["device"] == "cpu" and info["dtype"] == "torch.float32" and info["input"] == "cpu"
    assert info["name"] == "e5" and info["topk"] == "3"
    assert info["argv"][:2] == ["--index_path", "/i.faiss"]


def test_a_path_that_is_not_a_checkout_is_named(tmp_path: Path) -> None:
    with pytest.raises(PeerSourceError, match=str(tmp_path)):
        peer_command(tmp_path, index="i", corpus="c", encoder="m", retriever_name="e5", port=1)


def test_synthetic_corpus_rows_are_numbered_json(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    write_synthetic_corpus(path, 2_500, chunk=1_000)  # several chunks, a short last one
    lines = path.read_text().splitlines()
    assert len(lines) == 2_500 and len({len(x) for x in lines}) == 1
    store = CorpusStore(path)
    for i in (0, 999, 1_000, 2_499):
        row = store.get(i)
        assert row == json.loads(lines[i])
        assert (
            row["id"] == f"{i:010d}" and row["contents"] == f'"Synthetic {i:010d}"\nSynthetic passage number {i:010d}.'
        )
