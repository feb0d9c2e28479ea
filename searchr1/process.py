"""Child processes that jobs start and must stop on every exit path (retriever, SGLang): shared helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ParentTerminated(BaseException):
    """Raised in the parent when it gets SIGTERM while a child it manages runs (so cleanup runs)."""


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
        raise ParentTerminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
