"""The multi-process server (``serve --http-workers N``): N HTTP front-end processes, one batching worker.

The world is the hostile-client tests' (hash encoder, numpy search), so a server of 1 + N processes
starts in about a second. Each test runs the real ``MultiProcessServer`` in a process of its own, as
``serve`` does, and checks answers against brute force, the process group on every way out, and that
what the single-process server guarantees (limits, disconnects, fair batching) holds across processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import alive
from retriever_world import HashEncoder, World
from test_retrieval_hostile import (
    assert_serves,
    closed_within,
    connect,
    exit_time,
    read_response,
    request_head,
    wait_for,
)

from benchmarks.retriever.loadgen import run_load_sync
from searchr1.process import managed_process
from searchr1.retrieval.frontends import bind_group, rebind_group, resolve_http_workers
from searchr1.retrieval.server import PortInUseError, bind_socket

TESTS_DIR = Path(__file__).parent

SERVE_SCRIPT = """
import logging, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from retriever_world import World, HashEncoder, NumpyBackend
from searchr1.retrieval.corpus import CorpusStore
from searchr1.retrieval.frontends import MultiProcessServer, bind_group
from searchr1.retrieval.server import BatchingWorker, HttpLimits, Limits, index_info

# "fail ...": a server fault; "timed ...": a real encoder's cost, 20 ms a call + 2 ms a query
class Encoder(HashEncoder):
    def encode_queries(self, texts):
        if any(t.startswith("fail") for t in texts):
            raise RuntimeError("encoder fault")
        if any(t.startswith("timed") for t in texts):
            time.sleep(0.02 + 0.002 * len(texts))
        return super().encode_queries(texts)

logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
root, port, n = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
grace, batch = float(sys.argv[5]), int(sys.argv[6])
body_timeout = float(sys.argv[7])
sockets = bind_group("127.0.0.1", port, n)
world = World(root)
encoder, backend = Encoder(), NumpyBackend(world.vectors)
worker = BatchingWorker(None, encoder, backend, max_batch_size=batch, max_wait_ms=1.0)
limits = HttpLimits(max_header_bytes=4096, max_headers=20, keep_alive_timeout_s=5.0, header_timeout_s=0.5,
                    body_timeout_s=body_timeout, shutdown_grace_s=grace)
info = index_info(CorpusStore(world.corpus_path), encoder, backend)
server = MultiProcessServer(worker, corpus_path=world.corpus_path, info=info,
                            limits=Limits(topk_max=10, default_topk=3, max_queries=300), http_limits=limits,
                            sockets=sockets)
sys.exit(server.run())
"""


class Multi:
    """A multi-process server started through managed_process (its own process group), as jobs start one."""

    def __init__(
        self, tmp: Path, n: int = 3, grace_s: float = 1.0, batch: int = 256, body_timeout_s: float = 0.6
    ) -> None:
        self.tmp, self.n = tmp, n
        self.port = bind_socket("127.0.0.1", 0).getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/retrieve"
        self.world = World(tmp / "world")
        self.log = tmp / "server.log"
        self.cmd = [
            sys.executable,
            "-c",
            SERVE_SCRIPT,
            str(TESTS_DIR),
            str(tmp / "world"),
            str(self.port),
            str(n),
            str(grace_s),
            str(batch),
            str(body_timeout_s),
        ]
        self._cm = managed_process(
            self.cmd,
            name="multi-process retriever",
            log_path=self.log,
            healthy=self._healthy,
            startup_timeout_s=60,
            poll_interval_s=0.05,
            stop_grace_s=10,
        )

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def __enter__(self) -> Multi:
        self.proc = self._cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=5).json()

    def frontend_pids(self) -> set[int]:
        """The front ends' pids (children of the main process), from /proc."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Multi]:
    """The module's server: 3 front ends, batches of at most 16 queries (a large request is served in slices)."""
    with Multi(tmp_path_factory.mktemp("multi"), batch=16) as m:
        yield m


def test_answers_equal_brute_force_under_256_in_flight_over_every_front_end(multi: Multi) -> None:
    before = multi.health()["batching"]["requests"]
    queries = [f"load query {i}" for i in range(768)]  # three requests per client, 256 in flight throughout
    res = run_load_sync(multi.url, queries, 256, topk=3, keep_results=True)
    assert res.errors == 0
    assert res.results == [multi.world.expected(q, 3) for q in queries]
    info = multi.health()
    assert info["http_workers"] == 3 and info["pid"] == multi.proc.pid
    assert info["batching"]["requests"] - before == 768  # every request went through the one worker ...
    assert info["batching"]["mean_batch_queries"] > 1  # ... which batched them
    # New connections are spread over the front ends (SO_REUSEPORT), each a process of its own.
    answered_by = {httpx.get(multi.base + "/health", timeout=5).json()["frontend_pid"] for _ in range(40)}
    assert len(answered_by) >= 2 and answered_by <= multi.frontend_pids()
    assert len(multi.frontend_pids()) == 3


def test_scores_and_many_queries_per_request(multi: Multi) -> None:
    import numpy as np

    queries = [f"multi {i}" for i in range(40)]
    r = httpx.post(multi.url, json={"queries": queries, "topk": 5, "return_scores": True}, timeout=10)
    assert r.status_code == 200
    for q, hits in zip(queries, r.json()["result"]):
        assert [h["document"] for h in hits] == multi.world.expected(q, 5)
        want = np.sort(multi.world.vectors @ HashEncoder.vec(q))[::-1][:5]
        assert np.allclose([h["score"] for h in hits], want, atol=1e-6)


def test_bad_input_and_server_fault(multi: Multi) -> None:
    r = httpx.post(multi.url, json={"queries": ["x"], "topk": 11}, timeout=5)
    assert r.status_code == 422 and "topk_max=10" in r.json()["detail"]
    r = httpx.post(multi.url, json={"queries": ["fail now"]}, timeout=5)
    assert r.status_code == 500
    assert_serves(multi.world, multi.url)
    schema = httpx.get(multi.base + "/openapi.json", timeout=5).json()
    body = schema["paths"]["/retrieve"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["topk"]["maximum"] == 10


def test_disconnects_and_limits_are_counted_across_front_ends(multi: Multi) -> None:
    before = multi.health()["clients"]
    log_start = multi.log.stat().st_size
    for _ in range(3):  # a request whose client leaves while the worker computes it
        with connect(multi.port) as s:
            body = b'{"queries": ["slow query whose client leaves"]}'
            s.sendall(request_head(length=len(body)) + body)
            time.sleep(0.05)
    with connect(multi.port) as s:  # too many header fields: 431 from the front end itself
        s.sendall(request_head(extra="".join(f"X-{i}: y\r\n" for i in range(25)), length=2) + b"{}")
        status, headers, _ = read_response(s)
        assert status == 431 and headers["connection"] == "close"
        assert closed_within(s, 2.0)
    with connect(multi.port) as s:  # stalled headers: 408
        s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
        status, _, _ = read_response(s)
        assert status == 408

    def counted() -> bool:
        c = multi.health()["clients"]
        return (
            c["disconnects"] >= before["disconnects"] + 3
            and c["header_too_large"] == before["header_too_large"] + 1
            and c["header_timeouts"] == before["header_timeouts"] + 1
        )

    assert wait_for(counted, 5.0), multi.health()["clients"]
    assert "Traceback" not in multi.log.read_bytes()[log_start:].decode()
    assert_serves(multi.world, multi.url)


def test_a_dead_front_end_is_replaced(multi: Multi) -> None:
    pids = multi.frontend_pids()
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(multi.frontend_pids()) == 3 and victim not in multi.frontend_pids(), 10.0)
    # Every listening socket is served again: requests over many new connections all succeed.
    for i in range(30):
        r = httpx.post(multi.url, json={"queries": [f"after restart {i}"], "topk": 2}, timeout=5)
        assert r.status_code == 200 and r.json()["result"] == [multi.world.expected(f"after restart {i}", 2)]
    assert multi.health()["frontend_restarts"] >= 1


def _all_gone(pids: set[int], timeout_s: float) -> bool:
    return wait_for(lambda: not any(alive(p) for p in pids), timeout_s)


def _half_body(port: int) -> socket.socket:
    s = connect(port)
    s.sendall(request_head(length=200) + b'{"queries": ["half')
    return s


def test_sigterm_of_the_main_process_answers_in_flight_requests_and_stops_every_process(tmp_path: Path) -> None:
    with Multi(tmp_path, n=2, grace_s=1.0) as m:
        pids = m.frontend_pids() | {m.proc.pid}
        hostile = [_half_body(m.port) for _ in range(4)]  # on whichever front ends: none may hold the exit up
        assert_serves(m.world, m.url)
        out: dict = {}
        t = threading.Thread(
            target=lambda: out.update(r=httpx.post(m.url, json={"queries": ["slow in flight"]}, timeout=10))
        )
        t.start()
        time.sleep(0.1)  # the worker is computing it (0.3 s)
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)  # the main process alone, as a parent-death signal would
        t.join()
        assert out["r"].status_code == 200 and out["r"].json()["result"] == [m.world.expected("slow in flight", 3)]
        assert _all_gone(pids, 1.0 + 3.0), m.log.read_text()
        assert m.proc.wait() == 0 and time.monotonic() - t0 < 1.0 + 3.0
        log = m.log.read_text()
        assert "Traceback" not in log and "second signal" not in log, log
        for s in hostile:
            s.close()


def test_leaving_the_managed_block_stops_the_group_without_waiting_for_sigkill(tmp_path: Path) -> None:
    m = Multi(tmp_path, n=2, grace_s=0.5)
    with m:
        pids = m.frontend_pids() | {m.proc.pid}
        _half_body(m.port)
        t0 = time.monotonic()
    # managed_process's stop: SIGTERM to the whole group (front ends ignore it, the main process
    # stops them), SIGKILL only after stop_grace_s=10 s, which must not be needed.
    assert time.monotonic() - t0 < 0.5 + 3.0
    assert not any(alive(p) for p in pids)


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    # The half-sent body must outlive the test's windows: with the other tests' 0.6 s body deadline the
    # front end answers it 408 and closes, and the first signal's shutdown then ends at ~0.65 s (a race
    # with the 0.7 s window below).
    with Multi(tmp_path, n=2, grace_s=30.0, body_timeout_s=60.0) as m:
        pids = m.frontend_pids() | {m.proc.pid}
        s = _half_body(m.port)
        time.sleep(0.2)  # the front end reads the head: an unparsed connection is idle and is closed at once
        m.proc.send_signal(signal.SIGINT)
        assert exit_time(m.proc, 0.7) is None  # the first waits (up to 30 s) for the half-sent body ...
        m.proc.send_signal(signal.SIGINT)
        assert exit_time(m.proc, 1.5) is not None  # ... the second does not
        assert _all_gone(pids, 2.0)
        assert "second signal" in m.log.read_text()
        s.close()


def test_a_huge_request_on_one_front_end_does_not_hold_back_a_small_one(multi: Multi) -> None:
    # "timed" queries cost the encoder 20 ms per call + 2 ms per query; batches of 16: the 256-query request
    # takes 16 batches.
    def small(q: str) -> float:
        t = time.perf_counter()
        assert httpx.post(multi.url, json={"queries": [q], "topk": 2}, timeout=30).status_code == 200
        return time.perf_counter() - t

    alone = sorted(small(f"timed alone {i}") for i in range(5))[2]
    huge = [f"timed huge query {i}" for i in range(256)]
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(r=httpx.post(multi.url, json={"queries": huge, "topk": 2}, timeout=60))
    )
    t.start()
    time.sleep(0.1)
    # Fresh connections: some land on other front ends; all wait for at most the batch in flight.
    waits = [small(f"timed small {i}") / alone for i in range(4)]
    t.join()
    assert out["r"].status_code == 200 and out["r"].json()["result"] == [multi.world.expected(q, 2) for q in huge]
    assert max(waits) < 5.0, waits  # the whole huge request takes ~16 batches (~25x a small one alone)


def test_bind_group_refuses_a_busy_port() -> None:
    plain = bind_socket("127.0.0.1", 0)
    port = plain.getsockname()[1]
    with pytest.raises(PortInUseError, match=f"port {port}"):
        bind_group("127.0.0.1", port, 3)
    plain.close()
    group = bind_group("127.0.0.1", port, 3)
    try:
        assert len({s.fileno() for s in group}) == 3 and {s.getsockname()[1] for s in group} == {port}
        # Another server started on the port of a running group: refused, not silently joined.
        with pytest.raises(PortInUseError):
            bind_group("127.0.0.1", port, 2)
        with pytest.raises(PortInUseError):
            bind_socket("127.0.0.1", port)
    finally:
        for s in group:
            s.close()
    first = bind_socket("127.0.0.1", 0)
    regrouped = rebind_group(first, 2)
    assert len(regrouped) == 2 and first.fileno() == -1
    for s in regrouped:
        s.close()


def test_http_workers_auto_is_one_on_cpu_and_several_on_gpus() -> None:
    class Backend:
        def __init__(self, name: str) -> None:
            self.name = name

    assert resolve_http_workers("auto", Backend("torch-cpux1")) == 1
    assert resolve_http_workers("auto", Backend("faiss")) == 1
    assert resolve_http_workers("auto", Backend("torch-cuda-fp16x2")) > 1
    assert resolve_http_workers("auto", Backend("faiss_gpu")) > 1
    assert resolve_http_workers("3", Backend("faiss")) == 3
    with pytest.raises(ValueError, match="--http-workers"):
        resolve_http_workers("0", Backend("faiss"))


# Last: it ends the module's server (the fixture's stop then finds the group gone).
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_sigkill_of_the_main_process_takes_the_front_ends(multi: Multi) -> None:
    fronts = multi.frontend_pids()
    assert len(fronts) == 3
    multi.proc.kill()
    assert _all_gone(fronts, 3.0)


def test_front_end_tokenizes_small_requests_and_leaves_large_or_failing_ones_to_the_worker() -> None:
    """What a front end sends with a request's queries: their token ids when it can make them cheaply; the
    text alone (the worker tokenizes) for a request over FRONTEND_TOKENIZE_MAX_CHARS or when tokenizing fails."""
    from searchr1.retrieval.frontends import FRONTEND_TOKENIZE_MAX_CHARS, RemoteWorker

    ours, theirs = socket.socketpair()
    try:
        worker = RemoteWorker(ours, None, tokenize=lambda queries: [[len(q)] for q in queries])
        assert worker._token_ids(["ab", "c"]) == [[[2], [1]]]
        assert worker._token_ids(["x" * FRONTEND_TOKENIZE_MAX_CHARS, "y"]) == []

        def broken(queries):
            raise RuntimeError("tokenizer fault")

        worker.tokenize = broken
        assert worker._token_ids(["ab"]) == []
        assert RemoteWorker(ours, None)._token_ids(["ab"]) == []
    finally:
        ours.close()
        theirs.close()
