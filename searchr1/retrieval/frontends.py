"""The multi-process server: several HTTP front-end processes feeding one encode+search worker.

Why: on a GPU the batched encode + search of 256 queries takes a few tens of milliseconds, while the
HTTP layer (uvicorn, routing, validation, JSON, the request guard) costs ~0.5 ms of Python per
request. In one process that Python holds the GIL that the worker also needs, so the server could not
answer faster than ~2,000 requests/s however fast the GPU was. Here each front end is its own
process with its own GIL and listening socket; the worker process only batches, encodes and searches.

Layout (``serve --http-workers N``, N > 1):

- The main process (the one a job starts and stops) binds the port first, loads encoder, index and
  corpus, then binds N listening sockets on the same address (``SO_REUSEPORT``: the kernel spreads new
  connections evenly over them) and starts N front ends: ``python -m searchr1.retrieval.frontends``,
  each with one listening socket and one end of a socketpair to the main process (no path on disk).
- A front end runs the same app and the same guarded uvicorn protocol as the single-process server
  (limits, 431/408, disconnects, /health, OpenAPI), with a ``RemoteWorker`` in place of the batching
  worker: each request is forwarded at once (all requests of one event-loop turn in one message) and
  the answer comes back as scores and row ids; the front end looks the passages up in its own
  ``CorpusStore`` and writes the JSON, so that per-request work is spread over N processes too.
- The main process runs one ``BatchingWorker`` (raw mode) over the requests of all front ends: the
  same fair round-robin batching across requests, character budget and slicing of large requests as
  in one process. A client that leaves cancels its request in the worker.

Messages are length-prefixed orjson over the socketpair. Front end -> main: ``q`` new requests
``[id, topk, queries]``, ``x`` cancelled ids, ``c`` its client counters, ``h`` a health request id.
Main -> front end: ``r`` answers ``[id, [[scores, ids] per query]]``, ``e`` failures ``[id, message]``,
``h`` ``[id, health]``, ``stop``.

Signals: front ends ignore SIGTERM/SIGINT (a ``killpg`` reaches them too); the main process stops them
over the socketpair, keeps answering their in-flight requests for ``--shutdown-grace-s``, then exits.
A second signal kills the front ends and exits at once; a watchdog does the same if the shutdown
overruns. Front ends die with the main process (parent-death SIGKILL) and are restarted if one dies
while the server runs.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import orjson

from searchr1.retrieval.server import (
    BatchingWorker,
    ClientCounters,
    HttpLimits,
    Limits,
    PortInUseError,
    RetrieverServer,
    _hard_exit,
    bind_socket,
    build_app,
    hits_for,
)

log = logging.getLogger("searchr1.retrieval.frontends")

_HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 256 << 20  # far above any message (1,024 queries x 4,096 characters ~ 4 MiB)
# A front end that dies more often than this is not restarted again: the server stops (exit 1).
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
# HTTP front ends when the index is on GPUs and --http-workers is auto (see resolve_http_workers).
# Measured on H200s at 21M x 768, 256 requests in flight (benchmarks/retriever_gpu.json). Since the front
# ends also tokenize the queries (the worker's encode went from ~8.4 to ~3 ms a batch) they are the bound:
# one GPU 4 front ends 4,943 QPS, 6 front ends 5,680, 8 5,688; two GPUs 5,773, 5,874, 6,518.
GPU_HTTP_WORKERS = 6
# A front end tokenizes a request's queries itself only up to this many characters: slime's requests are
# one short query; a large request would stall the front end's event loop, so the worker (whose encoding
# runs off its event loop) tokenizes those.
FRONTEND_TOKENIZE_MAX_CHARS = 16384


# --- sockets ---------------------------------------------------------------------------------------


def bind_group(host: str, port: int, n: int, backlog: int = 4096) -> list[socket.socket]:
    """``n`` listening sockets on one address for ``n`` HTTP processes, or PortInUseError.

    With ``SO_REUSEPORT`` (Linux) each socket has its own accept queue and the kernel spreads new
    connections over them by a hash of the client address, so long-lived keep-alive connections end up
    evenly spread (one shared socket lets whichever process wakes first accept a whole burst). A plain
    bind first: it fails on any port already in use, also one held by another server's ``SO_REUSEPORT``
    group, which a reuse-port socket of the same user would silently join. Without ``SO_REUSEPORT``
    the processes share one socket.
    """
    probe = bind_socket(host, port, backlog)
    if n == 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [probe] * n
    port = probe.getsockname()[1]
    probe.close()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            s.listen(backlog)
            s.set_inheritable(False)
    except OSError as e:
        for s in socks:
            s.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(e.errno, f"port {port} on {host} is already in use (--port {port})") from None
        raise
    return socks


def rebind_group(sock: socket.socket, n: int) -> list[socket.socket]:
    """Replace the one socket bound before loading (the fast busy-port check) by a group of ``n``."""
    if n == 1:
        return [sock]
    host, port = sock.getsockname()[:2]
    sock.close()
    return bind_group(host, port, n)


def resolve_http_workers(value: str | int, backend: Any) -> int:
    """``--http-workers``: a number, or ``auto``: 1 when the index is searched on the CPU (there the encoder
    and the search cost milliseconds per query and the HTTP layer is not the limit), else
    ``GPU_HTTP_WORKERS`` (measured on an H200, see docs/retriever.md)."""
    if str(value) != "auto":
        n = int(value)
        if n < 1:
            raise ValueError(f"--http-workers must be >= 1 or auto, got {value}")
        return n
    return GPU_HTTP_WORKERS if on_gpu(backend) else 1


def on_gpu(backend: Any) -> bool:
    return backend.name == "faiss_gpu" or "cuda" in backend.name


# --- framing ---------------------------------------------------------------------------------------


class FrameProtocol(asyncio.Protocol):
    """Length-prefixed orjson messages over a connected stream socket."""

    def __init__(self, on_message: Callable[[dict], None], on_lost: Callable[[Exception | None], None]) -> None:
        self.on_message, self.on_lost = on_message, on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _HEADER.unpack_from(buf, pos)
            if n > MAX_FRAME_BYTES:
                log.error("IPC frame of %d bytes exceeds %d: closing the connection", n, MAX_FRAME_BYTES)
                self.transport.close()
                return
            if len(buf) - pos - 4 < n:
                break
            message = orjson.loads(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
            self.on_message(message)
        if pos:
            del buf[:pos]

    def send(self, message: dict) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        payload = orjson.dumps(message)
        self.transport.write(_HEADER.pack(len(payload)) + payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(exc)


# --- the front end ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _RemoteJob:
    queries: list[str]
    topk: int
    return_scores: bool
    future: asyncio.Future


class RemoteWorker:
    """BatchingWorker's interface in a front end: requests go to the worker process, passages are looked up here."""

    def __init__(
        self, ipc: socket.socket, corpus: Any, tokenize: Callable[[list[str]], list[list[int]]] | None = None
    ) -> None:
        """``tokenize``: the worker encoder's query tokenization (``query_token_ids``), done here so the
        worker process spends its time on the GPU; None sends the texts alone."""
        self.ipc, self.corpus, self.tokenize = ipc, corpus, tokenize
        self.counters: ClientCounters | None = None  # the app's, pushed to the main process when they change
        self.on_stop: Callable[[str], None] = lambda reason: None
        self._proto: FrameProtocol | None = None
        self._lost = False
        self._jobs: dict[int, _RemoteJob] = {}
        self._next_id = 0
        self._out_q: list = []
        self._out_x: list[int] = []
        self._flush_pending = False
        self._counters_sent: dict | None = None
        self._health: dict[int, asyncio.Future] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.forwarded = 0
        self.answered = 0
        self._stopping = False  # told to stop, or stopping: a closed connection is then expected

    def start(self) -> Any:
        return self._connect()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._proto = await loop.create_connection(
            lambda: FrameProtocol(self._on_message, self._on_lost), sock=self.ipc
        )
        self._timer = loop.call_later(0.2, self._tick)

    def _tick(self) -> None:  # counters of clients that never sent a request (431, idle) reach /health too
        self._schedule_flush()
        if not self._lost:
            self._timer = asyncio.get_running_loop().call_later(0.2, self._tick)

    async def stop(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        self._fail_all(RuntimeError("retriever is shutting down"))
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

    def enqueue(self, queries: list[str], topk: int, return_scores: bool) -> _RemoteJob:
        if self._proto is None or self._lost:
            raise RuntimeError("the retriever's worker process is not reachable")
        job = _RemoteJob(queries, topk, return_scores, asyncio.get_running_loop().create_future())
        rid = self._next_id
        self._next_id += 1
        self._jobs[rid] = job
        job.future.add_done_callback(partial(self._done, rid))
        self._out_q.append([rid, topk, queries, *self._token_ids(queries)])
        self.forwarded += 1
        self._schedule_flush()
        return job

    def _token_ids(self, queries: list[str]) -> list:
        """[the queries' token ids] to send along, or [] (the worker then tokenizes them itself)."""
        if self.tokenize is None or sum(map(len, queries)) > FRONTEND_TOKENIZE_MAX_CHARS:
            return []
        try:
            return [self.tokenize(queries)]
        except Exception as e:  # never fail a request over this: the worker can tokenize
            log.warning("front-end tokenization failed (%s: %s); the worker tokenizes", type(e).__name__, e)
            return []

    def _done(self, rid: int, _future: asyncio.Future) -> None:
        if self._jobs.pop(rid, None) is not None:  # ended here (client gone): the worker can drop it
            self._out_x.append(rid)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        message: dict = {}
        if self._out_q:
            message["q"], self._out_q = self._out_q, []
        if self._out_x:
            message["x"], self._out_x = self._out_x, []
        counters = self.counters.as_dict() if self.counters is not None else None
        if counters != self._counters_sent:
            message["c"] = self._counters_sent = counters
        if message and self._proto is not None:
            self._proto.send(message)

    def _on_message(self, message: dict) -> None:
        if "r" in message:
            docs: dict[int, dict] = {}  # rows shared by the answers of one batch
            for rid, per_query in message["r"]:
                job = self._jobs.pop(rid, None)
                if job is None or job.future.done():
                    continue
                try:
                    hits = [hits_for(self.corpus, s, i, job.topk, job.return_scores, docs) for s, i in per_query]
                except Exception as e:  # a corpus fault: this request fails (500), the others go on
                    job.future.set_exception(e)
                    continue
                self.answered += 1
                job.future.set_result(hits)
        for rid, error in message.get("e", ()):
            job = self._jobs.pop(rid, None)
            if job is not None and not job.future.done():
                job.future.set_exception(RuntimeError(error))
        if "h" in message:
            hid, info = message["h"]
            waiter = self._health.pop(hid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(info)
        if message.get("stop") and not self._stopping:
            self._stopping = True
            self.on_stop("the main process asked to stop")

    def _on_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._fail_all(RuntimeError("the retriever's worker process is gone"))
        if not self._stopping:
            self._stopping = True
            self.on_stop("the connection to the main process closed")

    def _fail_all(self, error: Exception) -> None:
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            if not job.future.done():
                job.future.set_exception(error)
        for waiter in self._health.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._health.clear()

    def stats(self) -> dict:
        return {"forwarded": self.forwarded, "answered": self.answered, "in_flight": len(self._jobs)}

    async def remote_health(self, counters: dict) -> dict:
        """The main process's view for /health: its pid, the batching worker's stats, every front end's clients."""
        if self._proto is None or self._lost:
            raise RuntimeError("the retriever's worker process is not reachable")
        hid = self._next_id
        self._next_id += 1
        waiter = asyncio.get_running_loop().create_future()
        self._health[hid] = waiter
        self._counters_sent = counters
        self._flush()  # requests queued before this one go first
        self._proto.send({"h": hid, "c": counters})
        try:
            async with asyncio.timeout(10.0):
                return await waiter
        finally:
            self._health.pop(hid, None)


def frontend_main(config: dict) -> int:
    """One HTTP front end: the app over a RemoteWorker, on the listening socket it inherited."""
    _die_with(config["parent_pid"])
    from searchr1.retrieval.corpus import CorpusStore

    logging.basicConfig(
        level=config["log_level"].upper(),
        format=f"%(asctime)s %(name)s[frontend {config['index']}] %(levelname)s %(message)s",
    )
    listen = socket.socket(fileno=config["listen_fd"])
    ipc = socket.socket(fileno=config["ipc_fd"])
    corpus = CorpusStore(config["corpus"], build_offsets_if_needed=False)
    worker = RemoteWorker(ipc, corpus, _query_tokenizer(config.get("query_tokenizer")))
    app = build_app(worker, config["info"], Limits(**config["limits"]), HttpLimits(**config["http_limits"]))
    worker.counters = app.state.counters
    server = RetrieverServer(app, listen, log_level=config["log_level"], signals=False)
    worker.on_stop = server.shutdown
    server.run()
    return 0


def _query_tokenizer(spec: dict | None) -> Callable[[list[str]], list[list[int]]] | None:
    """The worker encoder's query tokenization (``Encoder.query_tokenizer_spec``) in this process."""
    if not spec:
        return None
    from transformers import AutoTokenizer

    from searchr1.retrieval.encoder import query_token_ids

    tokenizer = AutoTokenizer.from_pretrained(spec["path"])
    return partial(query_token_ids, tokenizer, query_prefix=spec["query_prefix"], max_length=spec["max_length"])


# --- the main process ------------------------------------------------------------------------------


def _die_with(parent_pid: int) -> None:
    """In a front end, first thing: SIGKILL when the main process dies (it holds no state of its own).

    Set here rather than in a ``preexec_fn``, which would run Python between fork and exec of a parent
    with CUDA and worker threads. A parent that died before this line is caught by the pid check.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass(eq=False)
class _Frontend:
    index: int
    proc: subprocess.Popen
    proto: FrameProtocol | None = None
    jobs: dict = field(default_factory=dict)  # request id -> BatchingWorker job
    counters: dict = field(default_factory=dict)
    out_r: list = field(default_factory=list)
    out_e: list = field(default_factory=list)
    flush_pending: bool = False
    lost: bool = False


class MultiProcessServer:
    """The main process of ``serve --http-workers N``: N front-end processes, one batching worker here.

    ``worker`` is a ``BatchingWorker`` without a corpus (raw hits); ``corpus_path`` is what the front
    ends open for the lookups; ``sockets`` are the N listening sockets (``bind_group``).
    ``run()`` serves until SIGTERM/SIGINT (main thread) or ``request_exit()``.
    """

    def __init__(
        self,
        worker: BatchingWorker,
        *,
        corpus_path: str | os.PathLike,
        info: dict,
        limits: Limits,
        http_limits: HttpLimits,
        sockets: list[socket.socket],
        log_level: str = "info",
        env: dict | None = None,
    ) -> None:
        if worker.corpus is not None:
            raise ValueError("the multi-process server's worker answers raw hits: build it with corpus=None")
        self.worker, self.corpus_path, self.info = worker, str(corpus_path), info
        self.limits, self.http_limits, self.sockets = limits, http_limits, sockets
        self.log_level, self.env = log_level, env
        self.frontends: dict[int, _Frontend] = {}
        self.restarts: list[float] = []
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._signals = 0
        self.started = threading.Event()

    # -- running --
    def run(self) -> int:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self._main())
        return self.exit_code

    def request_exit(self) -> None:
        """Graceful stop from another thread (benchmarks, tests); signals do this in a process."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._begin_shutdown, "stop requested", False)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.worker.start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            for i in range(len(self.sockets)):
                await self._spawn(i)
            log.info(
                "%d HTTP front ends started (pids %s)",
                len(self.frontends),
                [fe.proc.pid for fe in self.frontends.values()],
            )
            self.started.set()
            await self._stop.wait()
            await self._shutdown()
        finally:
            self._kill_frontends()
            await self.worker.stop()

    async def _spawn(self, i: int) -> None:
        ours, theirs = socket.socketpair()
        listen = self.sockets[i]
        config = {
            "index": i,
            "parent_pid": os.getpid(),
            "listen_fd": listen.fileno(),
            "ipc_fd": theirs.fileno(),
            "corpus": self.corpus_path,
            "info": self.info,
            "limits": asdict(self.limits),
            "http_limits": asdict(self.http_limits),
            "log_level": self.log_level,
            # Front ends tokenize the queries when the worker's encoder says how (Encoder does).
            "query_tokenizer": spec() if (spec := getattr(self.worker.encoder, "query_tokenizer_spec", None)) else None,
        }
        env = {**os.environ, **(self.env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "searchr1.retrieval.frontends", json.dumps(config)],
            pass_fds=(listen.fileno(), theirs.fileno()),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        fe = self.frontends[i] = _Frontend(i, proc)
        _, fe.proto = await self._loop.create_connection(
            lambda: FrameProtocol(partial(self._on_message, fe), partial(self._on_lost, fe)), sock=ours
        )

    # -- messages from front ends --
    def _on_message(self, fe: _Frontend, message: dict) -> None:
        if "c" in message:
            fe.counters = message["c"] or {}
        for rid in message.get("x", ()):
            job = fe.jobs.pop(rid, None)
            if job is not None:
                job.future.cancel()  # the worker drops it (or ignores its answer)
        for rid, topk, queries, *token_ids in message.get("q", ()):
            try:
                job = self.worker.enqueue(queries, topk, False, token_ids[0] if token_ids else None)
            except Exception as e:
                fe.out_e.append([rid, f"{type(e).__name__}: {e}"])
                self._schedule_flush(fe)
                continue
            fe.jobs[rid] = job
            job.future.add_done_callback(partial(self._answered, fe, rid))
        if "h" in message:
            fe.proto.send({"h": [message["h"], self._health(fe)]})

    def _answered(self, fe: _Frontend, rid: int, future: asyncio.Future) -> None:
        if fe.jobs.pop(rid, None) is None or future.cancelled():
            return
        error = future.exception()
        if error is None:
            fe.out_r.append([rid, future.result()])
        else:
            fe.out_e.append([rid, f"{type(error).__name__}: {error}"])
        self._schedule_flush(fe)

    def _schedule_flush(self, fe: _Frontend) -> None:
        if not fe.flush_pending:
            fe.flush_pending = True
            self._loop.call_soon(self._flush, fe)

    def _flush(self, fe: _Frontend) -> None:
        fe.flush_pending = False
        message: dict = {}
        if fe.out_r:
            message["r"], fe.out_r = fe.out_r, []
        if fe.out_e:
            message["e"], fe.out_e = fe.out_e, []
        if message and fe.proto is not None:
            fe.proto.send(message)

    def _health(self, fe: _Frontend) -> dict:
        clients: dict[str, int] = {}
        for other in self.frontends.values():
            for key, value in other.counters.items():
                clients[key] = clients.get(key, 0) + value
        frontends_cpu = sum(_proc_cpu_s(f.proc.pid) for f in self.frontends.values())
        return {
            "pid": os.getpid(),
            "http_workers": len(self.sockets),
            "frontend_pid": fe.proc.pid,
            "frontend_restarts": len(self.restarts),
            "process_cpu_s": round(time.process_time() + frontends_cpu, 3),  # all processes of the server
            "worker_process_cpu_s": round(time.process_time(), 3),
            "batching": self.worker.stats(),
            "clients": clients,
        }

    def _on_lost(self, fe: _Frontend, exc: Exception | None) -> None:
        fe.lost = True
        for job in fe.jobs.values():
            job.future.cancel()
        fe.jobs.clear()
        if self._stopping or self.frontends.get(fe.index) is not fe:
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            log.error(
                "HTTP front end %d died; %d restarts within %.0f s: stopping the server",
                fe.index,
                len(self.restarts) - 1,
                RESTART_WINDOW_S,
            )
            self.exit_code = 1
            self._begin_shutdown("front ends keep dying", False)
            return
        self._loop.create_task(self._respawn(fe))

    async def _respawn(self, fe: _Frontend) -> None:
        for _ in range(100):  # it closed its end: it is exiting, or was killed
            if fe.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            fe.proc.kill()
        log.error(
            "HTTP front end %d (pid %d) exited with code %s: starting a new one", fe.index, fe.proc.pid, fe.proc.wait()
        )
        if not self._stopping:
            await self._spawn(fe.index)

    # -- stopping --
    def _on_signal(self, sig: int) -> None:
        self._begin_shutdown(signal.Signals(sig).name, True, 128 + sig)

    def _begin_shutdown(self, reason: str, from_signal: bool, second_exit_code: int = 1) -> None:
        if from_signal:
            self._signals += 1
            if self._signals > 1:
                log.warning("second signal (%s): exiting now", reason)
                self._kill_frontends()
                _hard_exit(second_exit_code)
        if self._stopping:
            return
        self._stopping = True
        grace = self.http_limits.shutdown_grace_s
        log.info("%s: shutting down (in-flight requests get %.1f s)", reason, grace)
        if from_signal:  # a process of its own: the shutdown is bounded whatever blocks it
            threading.Thread(target=self._watchdog, args=(grace + 1.5,), name="shutdown-watchdog", daemon=True).start()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGALRM, signal.SIG_DFL)  # backstop: the kernel ends the process
                signal.setitimer(signal.ITIMER_REAL, grace + 3.0)
        self._stop.set()

    async def _shutdown(self) -> None:
        for fe in self.frontends.values():
            if fe.proto is not None:
                fe.proto.send({"stop": True})
        # The front ends stop accepting, finish their in-flight requests (answered from here) within the
        # grace period, and exit; whatever still runs after it (+1 s) is killed.
        deadline = time.monotonic() + self.http_limits.shutdown_grace_s + 1.0
        while time.monotonic() < deadline and any(fe.proc.poll() is None for fe in self.frontends.values()):
            await asyncio.sleep(0.02)
        for s in self.sockets:
            s.close()

    def _kill_frontends(self) -> None:
        for fe in self.frontends.values():
            if fe.proc.poll() is None:
                try:
                    fe.proc.kill()
                except ProcessLookupError:
                    pass
            try:
                fe.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def _watchdog(self, after_s: float) -> None:
        time.sleep(after_s)
        log.error(
            "shutdown did not finish within shutdown_grace_s=%.1f s + 1.5 s: exiting hard",
            self.http_limits.shutdown_grace_s,
        )
        for fe in list(self.frontends.values()):
            try:
                fe.proc.kill()
            except OSError:
                pass
        _hard_exit(1)


if __name__ == "__main__":
    sys.exit(frontend_main(json.loads(sys.argv[1])))
