"""The retriever under hostile clients, networks and signals (issue 17).

Raw sockets where a client library would hide the behaviour (half-sent bodies, stalled headers,
oversized headers, silent connections). Every hostile case is followed by a normal request that
must still get the right passages. The world is tiny and model-free (hash encoder, numpy search),
so a server subprocess starts in well under a second.
"""

from __future__ import annotations

import json
import logging
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
from retriever_world import HashEncoder, NumpyBackend, World

from searchr1.retrieval.corpus import CorpusStore
from searchr1.retrieval.server import HttpLimits, RetrieverServer, bind_socket

TESTS_DIR = Path(__file__).parent


class LogRecords(logging.Handler):
    """Collects what the server logs (uvicorn, asyncio, ours): no traceback may appear."""

    NAMES = ("uvicorn.error", "asyncio", "searchr1")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def attach(self) -> None:
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.exc_info or "Exception in ASGI" in r.getMessage()]


class ThreadServer:
    """The production server class (guarded protocol, limits) on a free port, in a thread."""

    def __init__(self, app) -> None:
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/retrieve"
        self.server = RetrieverServer(app, self.sock, log_level="warning")
        self.logs = LogRecords()
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.logs.attach()  # after uvicorn's Config (re)configured its loggers
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.request_exit()
        self.thread.join(10)
        self.logs.detach()

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=5).json()


# Small limits so that every timeout fires within a second.
TEST_LIMITS = HttpLimits(
    max_header_bytes=4096,
    max_headers=20,
    keep_alive_timeout_s=0.5,
    header_timeout_s=0.5,
    body_timeout_s=0.6,
    shutdown_grace_s=1.0,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[ThreadServer]:
    app = world.app(
        topk_max=10,
        max_queries=8,
        max_query_chars=200,
        max_body_bytes=64_000,
        max_batch_size=8,
        http_limits=TEST_LIMITS,
    )
    with ThreadServer(app) as s:
        yield s


def assert_serves(world: World, url: str, query: str = "still serving?") -> None:
    """The normal request that follows every hostile one: right passages, in order."""
    r = httpx.post(url, json={"queries": [query, "second " + query], "topk": 3}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == [world.expected(query, 3), world.expected("second " + query, 3)]


# --- raw HTTP -------------------------------------------------------------------------------------


def connect(port: int, timeout_s: float = 3.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout_s)


def request_head(path: str = "/retrieve", method: str = "POST", extra: str = "", length: int | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{extra}"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + "\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (all of this server's answers have one)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    return status, headers, rest[:n]


def closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """True when the server closes the connection (EOF or reset) within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def wait_for(predicate, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- 1. client disconnects --------------------------------------------------------------------------


def _mid_body(port: int) -> None:
    with connect(port) as s:
        s.sendall(request_head(length=200) + b'{"queries": ["half')
        time.sleep(0.1)  # the handler is now reading the body


def _malformed_chunked(port: int) -> None:
    with connect(port) as s:
        s.sendall(request_head(extra="Transfer-Encoding: chunked\r\n") + b'5\r\n{"que\r\n')
        time.sleep(0.1)
        s.sendall(b"zz\r\nnot a chunk size\r\n")  # the parser rejects it and drops the connection
        closed_within(s, 2.0)


def _slow_then_gives_up(port: int) -> None:
    with connect(port) as s:
        s.sendall(request_head(length=100))
        for b in b'{"queries": [':  # a byte every 20 ms, then the client gives up (before the body timeout)
            s.sendall(bytes([b]))
            time.sleep(0.02)


def _while_computing(port: int) -> None:
    with connect(port) as s:
        body = b'{"queries": ["slow query whose client leaves"]}'
        s.sendall(request_head(length=len(body)) + body)
        time.sleep(0.1)  # the encoder is busy with it for 0.3 s


@pytest.mark.parametrize(
    "hostile",
    [_mid_body, _malformed_chunked, _slow_then_gives_up, _while_computing],
    ids=["mid-body", "malformed-chunked", "slow-then-gives-up", "while-computing"],
)
def test_client_disconnect_is_handled_and_counted(world: World, server: ThreadServer, hostile) -> None:
    before = server.health()["clients"]["disconnects"]
    hostile(server.port)
    assert wait_for(lambda: server.health()["clients"]["disconnects"] == before + 1), server.health()["clients"]
    assert server.logs.tracebacks() == []
    assert_serves(world, server.url)


# --- 2. SIGTERM / SIGINT bound the shutdown ---------------------------------------------------------------

SERVE_SCRIPT = """
import logging, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from retriever_world import World
from searchr1.retrieval.server import HttpLimits, RetrieverServer, bind_socket

logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
root, port, grace = Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sock = bind_socket("127.0.0.1", port)
app = World(root).app(http_limits=HttpLimits(shutdown_grace_s=grace))

@app.get("/block-loop")
async def block_loop():  # a stand-in for any bug that blocks the event loop
    time.sleep(60)

RetrieverServer(app, sock).run()
"""


def exit_time(proc_or_pid, timeout_s: float) -> float | None:
    """Seconds until the process is gone, or None if it still lives after ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        gone = proc_or_pid.poll() is not None if isinstance(proc_or_pid, subprocess.Popen) else not alive(proc_or_pid)
        if gone:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


class ServerProcess:
    def __init__(self, tmp: Path, grace_s: float) -> None:
        self.port = bind_socket("127.0.0.1", 0).getsockname()[1]  # closed again at once: a free port
        self.url = f"http://127.0.0.1:{self.port}/retrieve"
        self.world = World(tmp / "world")
        self.log = tmp / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVE_SCRIPT, str(TESTS_DIR), str(tmp / "world"), str(self.port), str(grace_s)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        ok = wait_for(self._healthy, 30)
        assert ok, self.log.read_text()

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(self.url.replace("/retrieve", "/health"), timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def half_body_client() -> Iterator:
    socks: list[socket.socket] = []

    def open_one(port: int) -> socket.socket:
        s = connect(port)
        s.sendall(request_head(length=200) + b'{"queries": ["half')
        socks.append(s)
        return s

    yield open_one
    for s in socks:
        s.close()


def test_sigterm_stops_within_grace_despite_a_half_sent_body(tmp_path: Path, half_body_client) -> None:
    srv = ServerProcess(tmp_path, grace_s=0.5)
    try:
        half_body_client(srv.port)
        assert_serves(srv.world, srv.url)  # others are served while the hostile client holds its connection
        srv.proc.send_signal(signal.SIGTERM)
        took = exit_time(srv.proc, 0.5 + 3.0)
        assert took is not None, srv.log.read_text()
        log = srv.log.read_text()
        assert "Traceback" not in log and "Exception in ASGI" not in log, log
    finally:
        srv.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_stops_at_once(tmp_path: Path, half_body_client, sig: int) -> None:
    srv = ServerProcess(tmp_path, grace_s=30.0)
    try:
        half_body_client(srv.port)
        srv.proc.send_signal(sig)
        assert exit_time(srv.proc, 0.7) is None  # the first signal waits (up to 30 s) for the client ...
        srv.proc.send_signal(sig)
        took = exit_time(srv.proc, 1.5)  # ... the second does not
        assert took is not None, srv.log.read_text()
        assert "second signal" in srv.log.read_text()
    finally:
        srv.kill()


def test_watchdog_ends_a_shutdown_stuck_in_the_event_loop(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path, grace_s=0.3)  # the watchdog fires 1.5 s after the grace period
    try:
        assert_serves(srv.world, srv.url)

        def block() -> None:
            try:
                httpx.get(srv.url.replace("/retrieve", "/block-loop"), timeout=30)
            except httpx.HTTPError:  # the server dies under it: expected
                pass

        threading.Thread(target=block, daemon=True).start()
        time.sleep(0.3)  # the event loop is now blocked for 60 s
        srv.proc.send_signal(signal.SIGTERM)
        took = exit_time(srv.proc, 0.3 + 3.0)
        assert took is not None, srv.log.read_text()
        assert "exiting hard" in srv.log.read_text()
    finally:
        srv.kill()


# --- 3. a managed retriever never outlives its SIGKILLed job ------------------------------------------

PARENT_SCRIPT = """
import sys, time
import searchr1.retrieval.managed as managed

tests, world = sys.argv[1], sys.argv[2]
def serve_command(*, port, extra_args, **_):  # the light test server instead of the model-loading CLI
    grace = extra_args[extra_args.index("--shutdown-grace-s") + 1]
    return [sys.executable, "-c", sys.argv[3], tests, world, str(port), grace]
managed.serve_command = serve_command
with managed.managed_server(corpus="-", index="-", encoder="-", log_path=sys.argv[4], startup_timeout_s=60,
                            shutdown_grace_s=0.5) as url:
    print(url, flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_managed_server_dies_with_its_sigkilled_job_despite_a_half_sent_body(tmp_path: Path, half_body_client) -> None:
    world = World(tmp_path / "world")
    log = tmp_path / "retriever.log"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_SCRIPT, str(TESTS_DIR), str(tmp_path / "world"), SERVE_SCRIPT, str(log)],
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = None
    try:
        url = parent.stdout.readline().strip()
        assert url.endswith("/retrieve"), log.read_text()
        pid = httpx.get(url.replace("/retrieve", "/health"), timeout=5).json()["pid"]
        half_body_client(int(url.split(":")[2].split("/")[0]))
        assert_serves(world, url)
        parent.kill()  # SIGKILL: no cleanup code of the job runs
        parent.wait()
        took = exit_time(pid, 0.5 + 3.0)
        assert took is not None, f"the retriever outlived its SIGKILLed job:\n{log.read_text()}"
    finally:
        parent.kill()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)


# --- 4. fair batching ---------------------------------------------------------------------------------


def _small_latency(url: str, query: str) -> float:
    t = time.perf_counter()
    r = httpx.post(url, json={"queries": [query], "topk": 2}, timeout=30)
    assert r.status_code == 200
    return time.perf_counter() - t


def _small_vs_huge(world: World, max_batch_size: int, tries: int = 1, enough=lambda ratio: True) -> float:
    """Latency of a one-query request sent 0.1 s after a 256-query one, over its latency alone (a ratio): the
    least of up to ``tries`` tries, stopping at the first for which ``enough(ratio)`` holds."""
    # Encoder cost: 20 ms per call + 2 ms per query, like a real encoder's fixed and per-query cost.
    app = world.app(HashEncoder(per_call_s=0.02, per_text_s=0.002), max_batch_size=max_batch_size, max_wait_ms=1.0)
    with ThreadServer(app) as srv:
        alone = sorted(_small_latency(srv.url, f"alone {i}") for i in range(5))[2]
        with_huge: list[float] = []
        for rep in range(tries):
            huge = [f"huge {rep} query {i}" for i in range(256)]
            out: dict = {}

            def post_huge(out: dict = out, huge: list = huge) -> None:
                out.update(r=httpx.post(srv.url, json={"queries": huge, "topk": 2}, timeout=60))

            t = threading.Thread(target=post_huge)
            t.start()
            time.sleep(0.1)
            with_huge.append(_small_latency(srv.url, f"small {rep}"))
            t.join()
            assert out["r"].status_code == 200  # the huge request is right too, slices reassembled in order
            assert out["r"].json()["result"] == [world.expected(q, 2) for q in huge]
            if enough(min(with_huge) / alone):
                break
        assert srv.logs.tracebacks() == []
        assert_serves(world, srv.url)
    return min(with_huge) / alone


def test_huge_request_does_not_hold_back_a_small_one(world: World) -> None:
    # Control: the huge request is a single batch. One try: noise lengthens the small request's wait, which
    # raises this ratio; the least of several tries could only make the control harder to pass.
    one_batch = _small_vs_huge(world, max_batch_size=256)
    # Fair: the huge request is served in 16 slices. A second try only when noise on a loaded machine spoilt
    # the first, the least of the two counting: the verdict of always taking the least of two tries, without
    # the second try's 0.8 s when the first passes.
    fair = _small_vs_huge(world, max_batch_size=16, tries=2, enough=lambda ratio: ratio < 5.0 and one_batch > 2 * ratio)
    # Fair: the small request waits for at most the batch in flight (~52 ms) plus its own; as one
    # batch, it waits for the rest of the whole huge request (~530 ms in all).
    assert fair < 5.0, (fair, one_batch)
    assert one_batch > 2 * fair, (fair, one_batch)


def test_long_queries_are_sliced_by_characters(world: World) -> None:
    import asyncio

    from searchr1.retrieval.server import BatchingWorker

    enc = HashEncoder()
    worker = BatchingWorker(
        CorpusStore(world.corpus_path),
        enc,
        NumpyBackend(world.vectors),
        max_batch_size=256,
        max_wait_ms=5,
        max_batch_chars=4000,
    )
    long = [f"{i} " + "x" * 998 for i in range(24)]  # 1,000 characters each: 4 per batch

    async def drive() -> tuple[list, list]:
        worker.start()
        big = asyncio.ensure_future(worker.submit(long, 2, False))
        await asyncio.sleep(0)
        small = await worker.submit(["a short one"], 2, True)
        out = await big
        await worker.stop()
        return out, small

    big, small = asyncio.run(drive())
    assert all(sum(map(len, call)) <= 4000 for call in enc.calls), [sum(map(len, c)) for c in enc.calls]
    assert len(enc.calls) >= 6
    assert any("a short one" in call for call in enc.calls[:2])  # joined the second batch, not the last
    assert big == [world.expected(q, 2) for q in long]
    assert [h["document"] for h in small[0]] == world.expected("a short one", 2)
    assert worker.stats()["split_requests"] == 1


# --- 5. HTTP limits -------------------------------------------------------------------------------------


def _header_too_large(s: socket.socket) -> tuple[int, bytes]:
    s.sendall(request_head(extra="X-Big: " + "a" * (2 << 20) + "\r\n", length=2))
    return read_response(s)[::2]


def _too_many_headers(s: socket.socket) -> tuple[int, bytes]:
    s.sendall(request_head(extra="".join(f"X-H{i}: v\r\n" for i in range(5000)), length=2))
    return read_response(s)[::2]


def _stalled_headers(s: socket.socket) -> tuple[int, bytes]:
    s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: test\r\n")
    return read_response(s)[::2]


def _slowloris_headers(s: socket.socket) -> tuple[int, bytes]:
    # A header byte every 50 ms until the answer comes: the deadline runs from the first byte, bytes do not
    # extend it. (Sending on after the answer only kept the server's lingering close busy for its second.)
    import select

    try:
        for b in b"POST /retrieve HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"z" * 100:
            if select.select([s], [], [], 0)[0]:  # the server answered
                break
            s.sendall(bytes([b]))
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return read_response(s)[::2]


def _stalled_body(s: socket.socket) -> tuple[int, bytes]:
    s.sendall(request_head(length=200) + b'{"queries": ["half')
    return read_response(s)[::2]


LIMIT_CASES = [
    (_header_too_large, 431, "max_header_bytes=4096", "header_too_large"),
    (_too_many_headers, 431, "max_headers=20", "header_too_large"),
    (_stalled_headers, 408, "header_timeout_s=0.5", "header_timeouts"),
    (_slowloris_headers, 408, "header_timeout_s=0.5", "header_timeouts"),
    (_stalled_body, 408, "body_timeout_s=0.6", "body_timeouts"),
]


@pytest.mark.parametrize("send,status,needle,counter", LIMIT_CASES, ids=[c[0].__name__[1:] for c in LIMIT_CASES])
def test_http_limits_answer_with_their_own_status(
    world: World, server: ThreadServer, send, status, needle, counter
) -> None:
    before = server.health()["clients"][counter]
    t0 = time.monotonic()
    with connect(server.port, timeout_s=5) as s:
        got, body = send(s)
        assert got == status, body
        assert needle in json.loads(body)["detail"]
        assert closed_within(s, 2.0)  # and the connection is closed
    assert time.monotonic() - t0 < 4.0
    assert server.health()["clients"][counter] == before + 1
    assert server.logs.tracebacks() == []
    assert_serves(world, server.url)


def test_idle_connections_are_closed(world: World, server: ThreadServer) -> None:
    before = server.health()["clients"]["idle_closed"]
    with connect(server.port) as silent, connect(server.port) as kept_alive:
        # One connection never sends a byte; the other is idle after a complete request and answer.
        body = b'{"queries": ["keep-alive"], "topk": 1}'
        kept_alive.sendall(request_head(length=len(body)) + body)
        status, _, answer = read_response(kept_alive)
        assert status == 200 and json.loads(answer)["result"] == [world.expected("keep-alive", 1)]
        assert closed_within(silent, 2.0)  # keep_alive_timeout_s=0.5
        assert closed_within(kept_alive, 2.0)
    assert server.health()["clients"]["idle_closed"] == before + 1
    assert_serves(world, server.url)


# --- 6. busy port ---------------------------------------------------------------------------------------


def test_busy_port_fails_fast_before_loading_anything(world: World, server: ThreadServer) -> None:
    # Nothing to load exists: a server that loaded before binding would fail on the files instead.
    missing = "/nonexistent/issue17"
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "searchr1.retrieval",
            "serve",
            "--corpus",
            f"{missing}/corpus.jsonl",
            "--index",
            f"{missing}/index.faiss",
            "--encoder",
            f"{missing}/model",
            "--port",
            str(server.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert f"port {server.port}" in r.stderr and "in use" in r.stderr, r.stderr
    assert missing not in r.stderr
    assert time.monotonic() - t0 < 15
    assert_serves(world, server.url)


# --- 7. HEAD /health --------------------------------------------------------------------------------------


def test_head_health(world: World, server: ThreadServer) -> None:
    with connect(server.port) as s:
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: test\r\n\r\nGET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        status, headers, _ = _read_head_only(s)
        assert status == 200 and int(headers["content-length"]) > 0
        # No body followed the HEAD answer: the next bytes on the connection are the GET's answer.
        status, _, body = read_response(s)
        assert status == 200 and json.loads(body)["status"] == "ok"
    assert httpx.head(server.base + "/health").status_code == 200
    assert_serves(world, server.url)


def _read_head_only(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """A HEAD answer's head: its Content-Length announces a body that is not sent."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(1)
    lines = buf.decode("latin-1").split("\r\n")[:-2]
    return (
        int(lines[0].split()[1]),
        {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])},
        b"",
    )


# --- property test over the OpenAPI schema ------------------------------------------------------------------


def from_schema(schema: dict):
    """A hypothesis strategy for the JSON Schema subset the /retrieve body uses (object, array, string with
    length and a ``\\S`` pattern, integer range, boolean): values that the schema accepts."""
    from hypothesis import strategies as st

    t = schema["type"]
    if t == "object":
        props = {k: from_schema(v) for k, v in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    if t == "array":
        return st.lists(
            from_schema(schema["items"]), min_size=schema.get("minItems", 0), max_size=schema.get("maxItems")
        )
    if t == "string":
        text = st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength"))
        if schema.get("pattern") not in (None, r"\S"):
            raise ValueError(f"pattern {schema['pattern']!r} is not covered by this test's generator")
        return text.filter(lambda x: bool(x.strip())) if "pattern" in schema else text
    if t == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if t == "boolean":
        return st.booleans()
    raise ValueError(f"schema type {t!r} is not covered by this test's generator")


def test_openapi_schema_property_no_5xx_no_traceback(world: World, server: ThreadServer) -> None:
    """Bodies drawn from the /retrieve schema (must get 200 and one hit list per query), arbitrary JSON and
    arbitrary bytes (must get a 4xx): never a 5xx, never a traceback, /health fine after every input."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    app_schema = httpx.get(server.base + "/openapi.json").json()
    body_schema = app_schema["paths"]["/retrieve"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "get" in app_schema["paths"]["/health"] and "head" in app_schema["paths"]["/health"]
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    bodies = (
        from_schema(body_schema).map(lambda b: ("valid", b))
        | st.dictionaries(st.sampled_from(["queries", "topk", "return_scores", "other"]), json_values, max_size=3).map(
            lambda b: ("json", b)
        )
        | json_values.map(lambda b: ("json", b))
        | st.binary(max_size=64).map(lambda b: ("bytes", b))
    )
    client = httpx.Client(timeout=10)

    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(case: tuple[str, object]) -> None:
        kind, body = case
        content = body if kind == "bytes" else json.dumps(body).encode()
        r = client.post(server.url, content=content, headers={"content-type": "application/json"})
        assert r.status_code < 500, (case, r.status_code, r.text)
        if kind == "valid":
            assert r.status_code == 200, (case, r.text)
            assert len(r.json()["result"]) == len(body["queries"])
        else:
            assert r.status_code == 200 or "detail" in r.json()
        h = client.get(server.base + "/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"

    try:
        check()
    finally:
        client.close()
    assert server.logs.tracebacks() == []
    assert_serves(world, server.url)


# --- the job's own stop escalates on every way out ------------------------------------------------------


def test_stop_process_group_kills_even_when_its_wait_is_interrupted() -> None:
    """A second SIGTERM (or Ctrl-C) of the job while it waits for the server must not skip the SIGKILL."""
    from searchr1.process import ParentTerminated, stop_process_group

    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        real_wait = proc.wait

        def interrupted_wait(timeout: float | None = None) -> int:
            if timeout is not None:  # the grace wait: the job's second SIGTERM arrives here
                raise ParentTerminated("received signal 15")
            return real_wait()

        proc.wait = interrupted_wait  # type: ignore[method-assign]
        with pytest.raises(ParentTerminated):
            stop_process_group(proc, grace_s=30)
        assert proc.poll() is not None  # SIGKILLed although it ignores SIGTERM and the wait was cut short
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
