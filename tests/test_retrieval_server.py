"""The HTTP retriever: Search-R1 API shapes, slime's client pattern, load, bad input, micro-batching."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest
import uvicorn
from helpers import server_kwargs

from benchmarks.retriever.loadgen import run_load
from searchr1.retrieval.corpus import CorpusStore
from searchr1.retrieval.index import FaissCPUBackend
from searchr1.retrieval.managed import free_port
from searchr1.retrieval.server import create_app

N_PASSAGES = 300
DIM = 24


class HashEncoder:
    """Each distinct text gets its own deterministic random unit vector (no model needed)."""

    name = "hash-encoder"

    def __init__(self) -> None:
        self.dim = DIM
        self.calls: list[int] = []

    def _vec(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return np.stack([self._vec(t) for t in texts])

    encode_passages = encode_queries


class World:
    def __init__(self, root: Path) -> None:
        self.corpus_path = root / "corpus.jsonl"
        rows = [
            {"id": f"doc{i}", "contents": f'"Title {i}"\nBody of passage {i}, with “quotes” and é.'}
            for i in range(N_PASSAGES)
        ]
        self.lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        self.corpus_path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        self.encoder = HashEncoder()
        self.vectors = np.stack([self.encoder._vec(r["contents"]) for r in rows])
        index = faiss.IndexFlatIP(DIM)
        index.add(self.vectors)
        self.backend = FaissCPUBackend(index)
        self.corpus = CorpusStore(self.corpus_path)

    def expected(self, query: str, k: int) -> tuple[list[dict], list[float]]:
        scores = self.vectors @ self.encoder._vec(query)
        ids = np.argsort(-scores, kind="stable")[:k]
        return [json.loads(self.lines[i]) for i in ids], [float(scores[i]) for i in ids]


class ServerThread:
    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/retrieve"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, backlog=2048
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("retrieval_server"))


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[ServerThread]:
    app = create_app(
        world.corpus,
        world.encoder,
        world.backend,
        topk_max=50,
        default_topk=3,
        max_queries=64,
        max_query_chars=500,
        max_body_bytes=20_000,
        max_batch_size=64,
        max_wait_ms=2.0,
    )
    with ServerThread(app) as s:
        yield s


@pytest.mark.parametrize("n_queries", [1, 5])
@pytest.mark.parametrize("return_scores", [False, True])
def test_retrieve_equals_brute_force(world: World, server: ServerThread, n_queries: int, return_scores: bool) -> None:
    queries = [f"question number {i}" for i in range(n_queries)]
    r = httpx.post(server.url, json={"queries": queries, "topk": 4, "return_scores": return_scores})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert len(result) == n_queries
    for q, hits in zip(queries, result):
        docs, scores = world.expected(q, 4)
        if return_scores:
            assert [h["document"] for h in hits] == docs
            np.testing.assert_allclose([h["score"] for h in hits], scores, rtol=1e-5)
        else:
            assert hits == docs  # the plain corpus rows, exactly as stored


def test_passages_are_returned_byte_exact(world: World, server: ServerThread) -> None:
    r = httpx.post(server.url, json={"queries": ["anything"], "topk": 3})  # topk default path too
    hits = r.json()["result"][0]
    for hit in hits:
        i = int(hit["id"].removeprefix("doc"))
        assert json.dumps(hit, ensure_ascii=False) == world.lines[i]
    r = httpx.post(server.url, json={"queries": ["anything"]})
    assert len(r.json()["result"][0]) == 3  # Search-R1's default topk


def _slime_style_clients(url: str, queries: list[str], concurrency: int, topk: int = 3) -> list[list[dict]]:
    """slime's pattern: one query per request, return_scores false; any failed request fails the test."""
    res = asyncio.run(run_load(url, queries, concurrency, topk=topk, keep_results=True, timeout_s=60))
    assert res.errors == 0 and res.requests == len(queries), res
    return res.results


def test_slime_client_pattern_256_in_flight(world: World, server: ServerThread) -> None:
    queries = [f"slime query {i}" for i in range(256)]
    results = _slime_style_clients(server.url, queries, 256)
    for q, hits in zip(queries, results):
        docs, _ = world.expected(q, 3)
        assert [h["contents"] for h in hits] == [d["contents"] for d in docs]


def test_load_256_clients_x_4_requests_all_correct(world: World, server: ServerThread) -> None:
    # 256 clients in flight throughout, each sending its next request when its answer comes: four requests each
    # exercise the cross-request batching as twenty did (3.3 s), in a quarter of the time.
    before = httpx.get(server.url.replace("/retrieve", "/health")).json()["batching"]
    queries = [f"load query {i % 1000}" for i in range(256 * 4)]
    results = _slime_style_clients(server.url, queries, 256, topk=2)
    assert len(results) == len(queries)
    for q, hits in zip(queries, results):
        assert hits == world.expected(q, 2)[0]
    after = httpx.get(server.url.replace("/retrieve", "/health")).json()["batching"]
    n_requests = after["requests"] - before["requests"]
    n_batches = after["batches"] - before["batches"]
    assert n_requests == len(queries)
    # Under 256 concurrent clients the worker must actually batch across requests.
    assert n_batches < n_requests / 4, (n_batches, n_requests)
    assert after["max_batch_queries"] <= 64


BAD_REQUESTS = [
    # (description, kwargs for httpx.post, expected status, a word the message must contain)
    (
        "malformed JSON",
        {"content": b'{"queries": [', "headers": {"content-type": "application/json"}},
        400,
        "malformed JSON",
    ),
    ("not an object", {"json": ["q"]}, 422, "JSON object"),
    ("missing queries", {"json": {"topk": 3}}, 422, "missing field 'queries'"),
    ("queries not a list", {"json": {"queries": "who?"}}, 422, "'queries' must be a list"),
    ("empty queries", {"json": {"queries": []}}, 422, "must not be empty"),
    ("non-string query", {"json": {"queries": ["ok", 5]}}, 422, "queries[1] must be a string"),
    ("null query", {"json": {"queries": [None]}}, 422, "queries[0] must be a string, got null"),
    ("empty query", {"json": {"queries": ["  "]}}, 422, "queries[0] is empty"),
    ("oversized query", {"json": {"queries": ["x" * 501]}}, 422, "max_query_chars=500"),
    ("too many queries", {"json": {"queries": ["q"] * 65}}, 422, "max_queries=64"),
    ("topk not int", {"json": {"queries": ["q"], "topk": "3"}}, 422, "'topk' must be an integer"),
    ("topk float", {"json": {"queries": ["q"], "topk": 2.5}}, 422, "'topk' must be an integer"),
    ("topk bool", {"json": {"queries": ["q"], "topk": True}}, 422, "'topk' must be an integer"),
    ("topk zero", {"json": {"queries": ["q"], "topk": 0}}, 422, "'topk' must be positive"),
    ("topk negative", {"json": {"queries": ["q"], "topk": -2}}, 422, "'topk' must be positive"),
    ("topk too large", {"json": {"queries": ["q"], "topk": 51}}, 422, "topk_max=50"),
    (
        "return_scores not bool",
        {"json": {"queries": ["q"], "return_scores": "yes"}},
        422,
        "'return_scores' must be a boolean",
    ),
    ("body too large", {"json": {"queries": ["q" * 400] * 60}}, 413, "max_body_bytes=20000"),
    (
        "wrong content type",
        {"content": b'{"queries": ["q"]}', "headers": {"content-type": "text/plain"}},
        415,
        "application/json",
    ),
    ("no content type", {"content": b'{"queries": ["q"]}'}, 415, "application/json"),
    (
        "invalid utf-8",
        {"content": b'{"queries": ["\xff"]}', "headers": {"content-type": "application/json"}},
        400,
        "malformed JSON",
    ),
]


@pytest.mark.parametrize("desc,kwargs,status,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_4xx_naming_the_problem(
    server: ServerThread, desc: str, kwargs: dict, status: int, needle: str
) -> None:
    r = httpx.post(server.url, **kwargs)
    assert r.status_code == status, (desc, r.status_code, r.text)
    assert needle in r.json()["detail"], r.text
    ok = httpx.post(server.url, json={"queries": ["still serving?"], "topk": 1})
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == 1


def test_chunked_body_over_limit_is_413(server: ServerThread) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"queries": ["'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"]}'

    r = httpx.post(server.url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]


def test_health_reports_index_and_batching(world: World, server: ServerThread) -> None:
    info = httpx.get(server.url.replace("/retrieve", "/health")).json()
    assert info["status"] == "ok" and info["passages"] == N_PASSAGES and info["dim"] == DIM
    assert info["backend"] == "faiss" and info["batching"]["enabled"] is True


def test_per_request_mode_never_batches(world: World) -> None:
    app = create_app(world.corpus, world.encoder, world.backend, batching=False, **server_kwargs())
    with ServerThread(app) as s:
        queries = [f"baseline {i}" for i in range(64)]
        results = _slime_style_clients(s.url, queries, 64)
        for q, hits in zip(queries, results):
            assert hits == world.expected(q, 3)[0]
        stats = httpx.get(s.url.replace("/retrieve", "/health")).json()["batching"]
    assert stats["enabled"] is False and stats["batches"] == stats["requests"] == 64
    assert stats["max_batch_queries"] == 1


def test_server_fault_is_a_500_and_the_server_keeps_serving(world: World) -> None:
    class FlakyEncoder(HashEncoder):
        def encode_queries(self, texts: list[str]) -> np.ndarray:
            if any("boom" in t for t in texts):
                raise RuntimeError("encoder exploded")
            return super().encode_queries(texts)

    app = create_app(world.corpus, FlakyEncoder(), world.backend, **server_kwargs())
    with ServerThread(app) as s:
        assert httpx.post(s.url, json={"queries": ["boom"]}).status_code == 500
        assert httpx.post(s.url, json={"queries": ["fine"], "topk": 2}).status_code == 200


def test_mismatched_corpus_and_backend_refused(world: World) -> None:
    index = faiss.IndexFlatIP(DIM)
    index.add(world.vectors[:10])
    with pytest.raises(ValueError, match="300 rows but the index has 10"):
        create_app(world.corpus, world.encoder, FaissCPUBackend(index), **server_kwargs())


# --- the benchmark's load generator (raw asyncio HTTP/1.1): its accounting must be exact -------------


def test_load_generator_counts_errors_and_keeps_serving_answers(world: World, server: ServerThread) -> None:
    # Every third query is over max_query_chars=500 -> a 422 that must count as an error, not a result.
    queries = [("y" * 600) if i % 3 == 0 else f"gen query {i}" for i in range(90)]
    res = asyncio.run(run_load(server.url, queries, 7, topk=2, keep_results=True, timeout_s=30))
    assert res.requests == 90 and len(res.latencies_s) == 90
    assert res.errors == 30
    for i, (q, hits) in enumerate(zip(queries, res.results)):
        assert hits is None if i % 3 == 0 else hits == world.expected(q, 2)[0]
    summary = res.summary()
    assert summary["requests"] == 90 and summary["errors"] == 30 and summary["qps"] > 0
    assert summary["p50_ms"] <= summary["p99_ms"]


def test_load_generator_duration_mode_cycles_queries(world: World, server: ServerThread) -> None:
    before = httpx.get(server.url.replace("/retrieve", "/health")).json()["batching"]["requests"]
    res = asyncio.run(run_load(server.url, ["a", "b", "c"], 4, duration_s=0.5, timeout_s=30))
    after = httpx.get(server.url.replace("/retrieve", "/health")).json()["batching"]["requests"]
    assert res.errors == 0 and res.requests > 3  # more requests than queries: clients cycled
    assert after - before == res.requests  # every counted request reached the server exactly once
    assert res.wall_s >= 0.5


def test_load_generator_survives_a_dead_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/retrieve"  # nothing listens there
    res = asyncio.run(run_load(url, ["q1", "q2", "q3", "q4"], 2, timeout_s=5))
    assert res.requests == 4 and res.errors == 4


def test_read_response_parses_status_and_body() -> None:
    from benchmarks.retriever.loadgen import _HTTPClientError, _read_response

    async def parse(raw: bytes) -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await _read_response(reader)

    ok = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 13\r\n\r\n{"result":[]}extra'
    assert asyncio.run(parse(ok)) == (200, b'{"result":[]}')
    assert asyncio.run(parse(b"HTTP/1.1 422 X\r\ncontent-length: 2\r\n\r\n{}"))[0] == 422
    for bad in (b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"):
        with pytest.raises(_HTTPClientError):
            asyncio.run(parse(bad))


def test_health_stage_timings_add_up(world: World, server: ServerThread) -> None:
    from benchmarks.retriever.cpu import _server_deltas

    health = server.url.replace("/retrieve", "/health")
    before = httpx.get(health).json()
    _slime_style_clients(server.url, [f"timed {i}" for i in range(40)], 40)
    after = httpx.get(health).json()
    d = _server_deltas(before, after)
    assert d["batches"] >= 1 and d["mean_batch_queries"] >= 1
    staged = d["worker_encode_s"] + d["worker_search_s"] + d["worker_lookup_s"]
    assert 0 < staged <= d["worker_busy_s"] + 1e-3
    assert d["server_cpu_s"] >= d["server_loop_thread_cpu_s"] >= 0


def test_duplicate_queries_in_a_batch_are_encoded_once(world: World) -> None:
    from searchr1.retrieval.server import BatchingWorker

    enc = HashEncoder()
    worker = BatchingWorker(world.corpus, enc, world.backend, max_batch_size=64, max_wait_ms=20)

    async def drive() -> list:
        worker.start()
        out = await asyncio.gather(*(worker.submit([f"same {i % 2}"], 3, i % 4 == 0) for i in range(8)))
        await worker.stop()
        return out

    out = asyncio.run(drive())
    assert sum(enc.calls) == 2 and worker.unique_queries == 2 and worker.queries == 8
    for i, (hits,) in enumerate(out):
        docs, scores = world.expected(f"same {i % 2}", 3)
        if i % 4 == 0:
            assert [h["document"] for h in hits] == docs
        else:
            assert hits == docs


def test_batch_under_load_waits_until_full_or_max_wait(world: World) -> None:
    """Under load a batch waits for more queries, but only until it is full: a long max_wait_ms costs
    nothing when the clients come back in time, and the whole wait when they do not."""
    from searchr1.retrieval.server import BatchingWorker

    async def drive(max_wait_ms: float, late: int) -> tuple[float, list[int]]:
        worker = BatchingWorker(world.corpus, HashEncoder(), world.backend, max_batch_size=4, max_wait_ms=max_wait_ms)
        worker.start()
        await asyncio.gather(*(worker.submit([f"first {i}"], 3, False) for i in range(2)))  # a batch of 2: load
        sizes = [worker.queries]
        t = time.perf_counter()
        first = asyncio.ensure_future(worker.submit(["one"], 3, False))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, *(worker.submit([f"late {i}"], 3, False) for i in range(late)))
        wall = time.perf_counter() - t
        sizes.append(worker.queries - sizes[0])
        batches = worker.batches
        await worker.stop()
        return wall, [sizes[0], sizes[1], batches]

    wall, (first, then, batches) = asyncio.run(drive(max_wait_ms=10_000, late=3))
    assert (first, then, batches) == (2, 4, 2) and wall < 2.0  # full after 50 ms: no 10 s wait
    wall, (first, then, batches) = asyncio.run(drive(max_wait_ms=300, late=1))
    assert (first, then, batches) == (2, 2, 2) and wall >= 0.29  # never full: the whole wait, one batch


def test_a_batch_whose_queries_all_come_tokenized_skips_the_tokenizer(world: World) -> None:
    """Token ids sent with the queries (a front end's) are encoded as they are when the whole batch has them;
    a batch with any query without them is encoded from the texts."""
    from searchr1.retrieval.server import BatchingWorker

    class Tokenized(HashEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.from_ids: list[list[list[int]]] = []

        def encode_query_ids(self, ids: list[list[int]]) -> np.ndarray:
            self.from_ids.append(ids)
            return self.encode_queries([f"query {seq[0]}" for seq in ids])

    enc = Tokenized()
    worker = BatchingWorker(world.corpus, enc, world.backend, max_batch_size=64, max_wait_ms=20)

    async def drive(with_ids: list[bool]) -> list:
        worker.start()
        out = await asyncio.gather(
            *(
                worker.submit([f"query {i}"], 3, False) if not w else _submit_ids(worker, [f"query {i}"], [[i]])
                for i, w in enumerate(with_ids)
            )
        )
        await worker.stop()
        return out

    async def _submit_ids(w, queries, ids):
        return await w.enqueue(queries, 3, False, ids).future

    out = asyncio.run(drive([True, True, True]))
    assert enc.from_ids == [[[0], [1], [2]]] and worker.pretokenized_queries == 3
    for i, (hits,) in enumerate(out):
        assert hits == world.expected(f"query {i}", 3)[0]
    asyncio.run(drive([True, False]))
    assert len(enc.from_ids) == 1 and worker.pretokenized_queries == 3  # mixed: from the texts
    with pytest.raises(ValueError, match="2 token id lists for 1 queries"):
        asyncio.run(_enqueue_bad(worker))


async def _enqueue_bad(worker) -> None:
    worker.enqueue(["q"], 3, False, [[1], [2]])


def test_bench_tables_show_ratio_and_stages() -> None:
    from benchmarks.retriever.cpu import markdown_table, stage_table

    def run(c: int, qps: float, batch: float) -> dict:
        return {
            "concurrency": c,
            "requests": 100,
            "errors": 0,
            "qps": qps,
            "p50_ms": 10.0,
            "p99_ms": 20.0,
            "mean_batch_queries": batch,
            "worker_encode_ms_per_query": 1.0,
            "worker_search_ms_per_query": 2.0,
            "worker_lookup_ms_per_query": 0.01,
            "server_cpu_s": 0.5,
            "server_loop_thread_cpu_s": 0.1,
            "load_generator_cpu_s": 0.02,
        }

    report = {
        "results": {
            "fp32": {
                "1000": {
                    "modes": {
                        "per_request": {"runs": [run(256, 10.0, 1)]},
                        "batching": {"runs": [run(256, 125.0, 200)]},
                    }
                }
            }
        }
    }
    assert "| fp32 | 1,000 | 256 | 10.0 | 125.0 | 12.5x |" in markdown_table(report)
    stages = stage_table(report)
    assert "| fp32 | 1,000 | batching | 200 | 1.0 | 2.0 | 0.01 | 5.0 | 1.00 | 0.20 |" in stages


# --- the served OpenAPI schema documents what the server answers ------------------------------------------


def test_openapi_declares_every_answer_and_the_running_servers_limits(world: World, server: ServerThread) -> None:
    """The schema a client reads (/openapi.json) carries this server's limits as JSON-schema constraints and
    every status /retrieve answers; real answers at and past each limit validate against what it declares."""
    import jsonschema

    base = server.url.removesuffix("/retrieve")
    schema = httpx.get(base + "/openapi.json").json()
    post = schema["paths"]["/retrieve"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    limits = server.server.config.app.state.limits
    assert body["properties"]["topk"]["maximum"] == limits.topk_max == 50
    assert body["properties"]["topk"]["default"] == limits.default_topk == 3
    assert body["properties"]["queries"]["maxItems"] == limits.max_queries == 64
    assert body["properties"]["queries"]["items"]["maxLength"] == limits.max_query_chars == 500
    assert str(limits.max_body_bytes) in post["description"]
    assert set(post["responses"]) == {"200", "400", "408", "413", "415", "422", "431", "500"}
    assert set(schema["paths"]["/health"]["get"]["responses"]) == {"200"}

    def declared(status: int) -> dict:
        return post["responses"][str(status)]["content"]["application/json"]["schema"]

    def answer(payload: dict) -> httpx.Response:
        return httpx.post(server.url, json=payload, timeout=10)

    ok = answer({"queries": ["q"], "topk": limits.topk_max})
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == limits.topk_max
    jsonschema.validate(ok.json(), declared(200))
    jsonschema.validate(answer({"queries": ["q"], "return_scores": True}).json(), declared(200))
    for bad in (
        {"queries": ["q"], "topk": limits.topk_max + 1},
        {"queries": ["q"] * (limits.max_queries + 1)},
        {"queries": ["x" * (limits.max_query_chars + 1)]},
    ):
        r = answer(bad)
        assert r.status_code == 422, r.text
        jsonschema.validate(r.json(), declared(422))
        jsonschema.validate(bad, {"not": body})  # the declared body schema refuses it too
    big = httpx.post(
        server.url, content=b"x" * (limits.max_body_bytes + 1), headers={"content-type": "application/json"}
    )
    assert big.status_code == 413
    jsonschema.validate(big.json(), declared(413))
