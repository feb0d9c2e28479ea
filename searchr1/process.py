"""Child processes that a job starts and must stop on every exit path: the one way to run a server.

``managed_process`` is what the retriever (``searchr1.retrieval.managed``), the SGLang evaluation server
(``searchr1.evaluate.sglang_server``) and the Ray/slime launch (``searchr1.slime_launch.run_plan``) use:
the child runs in its own process group and session, gets SIGTERM when the job dies (even by SIGKILL),
is waited for until healthy (an error with the log's tail when it exits first or the wait times out), and
its whole group is stopped (SIGTERM, then SIGKILL) on every way out of the block: normal exit, exception,
and SIGTERM of the job (SLURM's ``scancel``, Snakemake's cancel), which is turned into ``ParentTerminated``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO


class ParentTerminated(SystemExit):
    """Raised in the parent when it gets SIGTERM while a child it manages runs (so cleanup runs).

    A ``SystemExit`` with status 128 + signal number: no ``except Exception`` swallows it, and a job that
    lets it through exits as a job killed by that signal would (143 for SIGTERM), without a traceback.
    """

    def __init__(self, message: str = "received signal 15", signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + int(signum))
        self.message = message
        self.signum = int(signum)

    def __str__(self) -> str:
        return self.message


class StartError(RuntimeError):
    """A managed child did not become healthy: it exited first, or the wait for it timed out."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(log_path: str | os.PathLike, n_bytes: int = 4000) -> str:
    """The last ``n_bytes`` of a log, for error messages."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - n_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for a managed child: Linux sends it SIGTERM when the process that started it dies.

    The child runs in its own session (so its whole group can be stopped), which also shields it from a
    kill of the job's process group; without this, a SIGKILLed job (OOM killer, preemption, a killed
    Snakemake) would leave its retriever or SGLang server running forever. Elsewhere this does nothing.
    Call it in the parent: ``Popen(..., preexec_fn=die_with_parent())``.
    """
    parent = os.getpid()

    def preexec() -> None:
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), SIGKILL it after ``grace_s``.

    Servers such as SGLang spawn children (scheduler, detokenizer) in the same group, so the whole group goes.
    The SIGKILL also comes when the wait is interrupted (a second SIGTERM or a Ctrl-C of the parent
    raising out of it): on every way out of here the group is gone.
    """
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        # Also when the leader is gone: members of its group that ignored the SIGTERM go now.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises ParentTerminated so that finally-blocks run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise ParentTerminated(f"received signal {signum}", signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 now (no proxy from the environment; errors mean no)."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def managed_process(
    command: Sequence[str],
    *,
    name: str,
    log_path: str | os.PathLike,
    healthy: Callable[[], bool] | None = None,
    startup_timeout_s: float = 600.0,
    poll_interval_s: float = 0.2,
    stop_grace_s: float = 10.0,
    env: Mapping[str, str] | None = None,
    stdout: int | IO | None = None,
    error: type[Exception] = StartError,
    popen: Callable[..., subprocess.Popen] = subprocess.Popen,
) -> Iterator[subprocess.Popen]:
    """Start ``command`` as a managed child, wait until ``healthy()`` is true, yield it, stop its group.

    The child runs in its own session and process group (so its whole tree can be stopped, and a kill of the
    job's group does not skip our cleanup), with a parent-death signal (it gets SIGTERM when the job dies
    without running any code: SIGKILL, the OOM killer); its output is appended to ``log_path`` (``stdout``
    replaces that, e.g. ``subprocess.PIPE``). ``env`` adds variables to the environment. Without
    ``healthy`` it is yielded at once. ``error`` (a ``StartError`` by default) names ``name``, the exit
    status or the timeout, and the last lines of the log. On every way out of the block the group gets
    SIGTERM, then SIGKILL after ``stop_grace_s``; while the block runs (in the main thread) SIGTERM raises
    ``ParentTerminated``. A server that spawns children must take them along when it gets SIGTERM: after a
    SIGKILL of the job only the child itself is signalled.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_raises(), ExitStack() as stack:
        log = stack.enter_context(open(log_path, "ab"))
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} [{name}] starting: {list(command)}\n".encode())
        log.flush()
        proc = popen(
            list(command),
            stdout=log if stdout is None else stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so the whole tree can be stopped
            preexec_fn=die_with_parent(),  # and it goes when this job dies, even by SIGKILL
            env={**os.environ, **env} if env else None,
        )
        stack.callback(stop_process_group, proc, stop_grace_s)
        if healthy is not None:
            wait_healthy(
                proc,
                healthy,
                name=name,
                log_path=log_path,
                timeout_s=startup_timeout_s,
                poll_interval_s=poll_interval_s,
                error=error,
            )
        yield proc


def wait_healthy(
    proc: subprocess.Popen,
    healthy: Callable[[], bool],
    *,
    name: str,
    log_path: str | os.PathLike,
    timeout_s: float,
    poll_interval_s: float = 0.2,
    error: type[Exception] = StartError,
) -> None:
    """Poll ``healthy()`` until it is true; raise ``error`` (with the log's tail) when ``proc`` exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise error(
                f"{name} exited with code {proc.returncode} before it was healthy; "
                f"last lines of {log_path}:\n{log_tail(log_path)}"
            )
        if healthy():
            return
        if time.monotonic() > deadline:
            raise error(f"{name} not healthy after {timeout_s:.0f} s; last lines of {log_path}:\n{log_tail(log_path)}")
        time.sleep(poll_interval_s)
