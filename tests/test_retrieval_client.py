"""RetrievalClient against a scripted Search-R1-shaped server: shapes, batching, retries, errors, stats."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from helpers import config, free_port, serve_app

from searchr1.retrieval.client import RetrievalClient, RetrievalError

# The client's timeout and retries are the config's (retriever.timeout_s, retriever.max_retries: 60 s, 3).
_RET = config()["retriever"]


def make_client(url: str, **kwargs) -> RetrievalClient:
    return RetrievalClient(url, **{"timeout_s": _RET["timeout_s"], "max_retries": _RET["max_retries"], **kwargs})


def corpus_row(query: str, rank: int) -> dict:
    return {"id": f"{query}-{rank}", "contents": f'"Title {query} {rank}"\ntext about {query}'}


def make_retriever_app(script: dict) -> FastAPI:
    """Search-R1's /retrieve reply shapes, plus scripted failures and delays: a request follows the behaviour
    ``script["behaviour"]`` holds when it arrives (a test's own dict, which records what reached it)."""
    app = FastAPI()

    @app.post("/retrieve")
    async def retrieve(request: Request):
        behaviour = script["behaviour"]
        payloads = behaviour.setdefault("payloads", [])
        state = behaviour.setdefault("state", {"in_flight": 0, "max_in_flight": 0})
        payload = await request.json()
        payloads.append(payload)
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            await asyncio.sleep(behaviour.get("delay_s", 0.0))
            if behaviour.get("fail_first"):
                status = behaviour["fail_first"].pop(0)
                return JSONResponse({"detail": f"scripted failure {status}"}, status_code=status)
            if "reply" in behaviour:
                return behaviour["reply"]
            hits = [[corpus_row(q, r) for r in range(payload["topk"])] for q in payload["queries"]]
            if payload["return_scores"]:
                hits = [[{"document": h, "score": 1.0 / (r + 1)} for r, h in enumerate(hs)] for hs in hits]
            return {"result": hits}
        finally:
            state["in_flight"] -= 1

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[tuple[str, dict]]:
    """One scripted server for the module (a server per test cost about 0.15 s to start and stop)."""
    script: dict = {}
    with serve_app(make_retriever_app(script)) as base:
        yield base, script


@pytest.fixture
def serve(scripted_server: tuple[str, dict]) -> Iterator[Callable[[dict], str]]:
    """``serve(behaviour)``: the module's server follows ``behaviour`` from now on; returns its base URL."""
    base, script = scripted_server

    def follow(behaviour: dict) -> str:
        script["behaviour"] = behaviour
        return base

    yield follow
    script.pop("behaviour", None)


def run_search(url: str, queries, topk: int = 2, **kwargs):
    async def main():
        async with make_client(url, **kwargs) as client:
            try:
                return await client.search(queries, topk)
            finally:
                main.stats = client.stats

    try:
        return asyncio.run(main())
    finally:
        run_search.stats = main.stats


def test_one_query_per_request_by_default(serve):
    behaviour: dict = {}
    base = serve(behaviour)
    hits = run_search(base + "/retrieve", ["alpha", "beta", "gamma"], topk=3)
    assert [[h["id"] for h in hs] for hs in hits] == [
        [f"{q}-{r}" for r in range(3)] for q in ["alpha", "beta", "gamma"]
    ]
    assert hits[0][0] == corpus_row("alpha", 0)
    assert sorted(p["queries"][0] for p in behaviour["payloads"]) == ["alpha", "beta", "gamma"]
    assert all(p == {"queries": p["queries"], "topk": 3, "return_scores": False} for p in behaviour["payloads"])
    assert all(len(p["queries"]) == 1 for p in behaviour["payloads"])
    assert run_search.stats == {"requests": 3, "retries": 0, "failures": 0}


def test_batch_mode_sends_one_request(serve):
    behaviour: dict = {}
    base = serve(behaviour)
    hits = run_search(base + "/retrieve", ["alpha", "beta"], batch=True)
    assert [hs[1]["id"] for hs in hits] == ["alpha-1", "beta-1"]
    assert behaviour["payloads"] == [{"queries": ["alpha", "beta"], "topk": 2, "return_scores": False}]


def test_scored_hits_are_unwrapped_to_rows(serve):
    behaviour = {"reply": {"result": [[{"document": corpus_row("q", 0), "score": 0.5}]]}}
    base = serve(behaviour)
    assert run_search(base + "/retrieve", ["q"]) == [[corpus_row("q", 0)]]


def test_no_queries_no_request():
    assert run_search(f"http://127.0.0.1:{free_port()}/retrieve", []) == []
    assert run_search.stats["requests"] == 0
    with pytest.raises(TypeError, match="list of strings"):
        run_search(f"http://127.0.0.1:{free_port()}/retrieve", "alpha")


def test_5xx_is_retried_with_backoff(serve):
    behaviour = {"fail_first": [500, 503]}
    base = serve(behaviour)
    hits = run_search(base + "/retrieve", ["alpha"], backoff_s=0.01)
    assert hits[0][0]["id"] == "alpha-0"
    assert run_search.stats == {"requests": 3, "retries": 2, "failures": 0}


def test_persistent_5xx_raises_after_retries(serve):
    behaviour = {"fail_first": [500] * 10}
    base = serve(behaviour)
    with pytest.raises(RetrievalError, match=r"HTTP 500.*scripted failure 500.*after 3 attempts") as info:
        run_search(base + "/retrieve", ["alpha"], max_retries=2, backoff_s=0.01)
    assert info.value.status_code == 500
    assert run_search.stats == {"requests": 3, "retries": 2, "failures": 1}


def test_4xx_raises_at_once_with_server_message(serve):
    behaviour = {"fail_first": [422]}
    base = serve(behaviour)
    with pytest.raises(RetrievalError, match="HTTP 422.*scripted failure 422") as info:
        run_search(base + "/retrieve", ["alpha"], backoff_s=0.01)
    assert info.value.status_code == 422
    assert run_search.stats == {"requests": 1, "retries": 0, "failures": 1}


def test_unreachable_server_raises_after_retries():
    with pytest.raises(RetrievalError, match="unreachable.*ConnectError.*after 2 attempts") as info:
        run_search(f"http://127.0.0.1:{free_port()}/retrieve", ["alpha"], max_retries=1, backoff_s=0.01)
    assert info.value.__cause__ is not None
    assert run_search.stats == {"requests": 2, "retries": 1, "failures": 1}


def test_timeouts_are_retried_then_raised(serve):
    # The server answers after 1 s, the client gives up after 0.3 s. Which phase times out (a read, or the
    # connect on a loaded 2-core machine) does not matter: a timeout is retried, then raised. (The delayed
    # handlers end a second later, answering clients that have gone, with this test's behaviour.)
    behaviour = {"delay_s": 1.0}
    base = serve(behaviour)
    with pytest.raises(RetrievalError, match=r"(Read|Connect)Timeout"):
        run_search(base + "/retrieve", ["alpha"], timeout_s=0.3, max_retries=1, backoff_s=0.01)
    assert run_search.stats["retries"] == 1


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"result": []}, "expected 'result' with 1 hit lists"),
        ({"results": [[]]}, "expected 'result'"),
        ({"result": [{"id": "x"}]}, "hit list is not a list"),
        ({"result": [[{"id": "x"}]]}, "no 'contents'"),
    ],
)
def test_malformed_replies_raise(reply, message, serve):
    base = serve({"reply": reply})
    with pytest.raises(RetrievalError, match=message):
        run_search(base + "/retrieve", ["alpha"])
    assert run_search.stats["failures"] == 1


def test_concurrency_is_bounded(serve):
    behaviour = {"delay_s": 0.05}
    base = serve(behaviour)
    hits = run_search(base + "/retrieve", [f"q{i}" for i in range(12)], concurrency=4)
    assert [hs[0]["id"] for hs in hits] == [f"q{i}-0" for i in range(12)]
    assert 1 <= behaviour["state"]["max_in_flight"] <= 4


def test_health(serve):
    base = serve({})

    async def main():
        async with make_client(base + "/retrieve") as client:
            return await client.health()

    assert asyncio.run(main()) == {"status": "ok"}

    async def down():
        async with make_client(f"http://127.0.0.1:{free_port()}/retrieve") as client:
            await client.health()

    with pytest.raises(RetrievalError, match="health check"):
        asyncio.run(down())


def test_idle_connections_are_not_reused_into_a_closing_server(monkeypatch):
    """A connection idle longer than KEEPALIVE_EXPIRY_S is dropped, not sent on: a server whose keep-alive
    timeout is passing closes it under the request (a ReadError, then a retry after backoff). The scripted
    server here closes every connection on its second request, as such a server does."""
    import searchr1.retrieval.client as client_module

    monkeypatch.setattr(client_module, "KEEPALIVE_EXPIRY_S", 0.2)
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        requests = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            requests += 1
            if requests > 1:
                writer.close()
                return
            body = b'{"result": [[{"id": "1", "contents": "x"}]]}'
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()

    async def main() -> dict:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, make_client(f"http://127.0.0.1:{port}/retrieve", backoff_s=0.01) as client:
            await client.search(["a"], 1)
            await asyncio.sleep(0.4)  # idle past the client's expiry
            await client.search(["b"], 1)
            return client.stats

    assert asyncio.run(main()) == {"requests": 2, "retries": 0, "failures": 0}
    assert len(connections) == 2


def test_start_on_first_search_starts_once(serve):
    from searchr1.retrieval.client import StartOnFirstSearch

    base = serve({})
    starts = []

    def start() -> str:
        starts.append(1)
        return base + "/retrieve"

    async def main() -> tuple:
        retriever = StartOnFirstSearch(start, make_client)
        before = (await retriever.search([], 2), retriever.url, retriever.stats, len(starts))
        both = await asyncio.gather(retriever.search(["a"], 2), retriever.search(["b", "c"], 1))
        after = (retriever.url, retriever.stats)
        await retriever.aclose()
        return before, both, after

    before, both, after = asyncio.run(main())
    assert before == ([], None, {"requests": 0, "retries": 0, "failures": 0}, 0)
    assert [[h["id"] for h in hs] for hits in both for hs in hits] == [["a-0", "a-1"], ["b-0"], ["c-0"]]
    assert starts == [1] and after == (base + "/retrieve", {"requests": 3, "retries": 0, "failures": 0})
