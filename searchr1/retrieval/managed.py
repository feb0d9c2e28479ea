"""A retriever that the consuming job starts, health-checks and stops itself.

``with managed_server(corpus=..., index=..., encoder=..., log_path=...) as url:`` starts
``python -m searchr1.retrieval serve`` through ``searchr1.process.managed_process`` (127.0.0.1, a free
port by default), waits for ``/health``, yields the ``/retrieve`` URL and stops the process group
(SIGTERM, then SIGKILL) on every way out: normal exit, exception, and SIGTERM of the parent (turned into
an exception while the block runs). A parent that dies without running any code (SIGKILL, OOM killer)
cannot escalate: its parent-death signal gives the server a SIGTERM, and the server itself
guarantees its exit within its ``--shutdown-grace-s`` plus a second, whatever its clients do.
With ``url=...`` it only checks that server and yields it.
This works the same on a laptop, in a Snakemake job and inside a SLURM allocation.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import httpx

from searchr1.process import ParentTerminated, StartError, free_port, managed_process, stop_process_group

__all__ = [
    "ParentTerminated",
    "RetrieverStartError",
    "check_health",
    "free_port",
    "managed_server",
    "serve_command",
    "stop_process_group",
]


class RetrieverStartError(StartError):
    """The retriever did not come up (process died, timed out, or the given URL is down)."""


def health_url_for(retrieve_url: str) -> str:
    base = retrieve_url.rstrip("/")
    if base.endswith("/retrieve"):
        base = base[: -len("/retrieve")]
    return base + "/health"


def check_health(retrieve_url: str, timeout_s: float = 5.0) -> dict:
    """GET the server's /health; raise RetrieverStartError naming the URL when it is not healthy."""
    url = health_url_for(retrieve_url)
    try:
        r = httpx.get(url, timeout=timeout_s)
        r.raise_for_status()
        info = r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise RetrieverStartError(f"retriever at {url} is not healthy: {e}") from e
    if info.get("status") != "ok":
        raise RetrieverStartError(f"retriever at {url} reports status {info.get('status')!r}")
    return info


def serve_command(
    *,
    corpus: str | os.PathLike,
    index: str | os.PathLike,
    encoder: str | os.PathLike,
    host: str,
    port: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "searchr1.retrieval",
        "serve",
        "--corpus",
        str(corpus),
        "--index",
        str(index),
        "--encoder",
        str(encoder),
        "--host",
        host,
        "--port",
        str(port),
        *extra_args,
    ]


@contextmanager
def managed_server(
    *,
    corpus: str | os.PathLike | None = None,
    index: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float,
    log_path: str | os.PathLike = "logs/retriever.log",
    url: str | None = None,
    extra_args: Sequence[str] = (),
    stop_grace_s: float = 10.0,
    env: Mapping[str, str] | None = None,
    shutdown_grace_s: float | None = None,
) -> Iterator[str]:
    """Yield the ``/retrieve`` URL of a healthy retriever, starting and stopping one if ``url`` is None.

    ``env`` adds variables to the server's environment (e.g. ``OMP_WAIT_POLICY``). ``shutdown_grace_s``
    sets the server's ``--shutdown-grace-s`` (default: the server's); the SIGKILL of ``stop_grace_s``
    never comes before the server's own deadline has passed.
    """
    if url:
        check_health(url)
        yield url
        return
    if corpus is None or index is None or encoder is None:
        raise ValueError("managed_server needs corpus, index and encoder when no url is given")
    port = port or free_port(host)
    retrieve_url = f"http://{host}:{port}/retrieve"
    if shutdown_grace_s is not None:
        extra_args = [*extra_args, "--shutdown-grace-s", str(shutdown_grace_s)]
        stop_grace_s = max(stop_grace_s, shutdown_grace_s + 2.0)
    cmd = serve_command(corpus=corpus, index=index, encoder=encoder, host=host, port=port, extra_args=extra_args)

    def healthy() -> bool:
        try:
            check_health(retrieve_url, timeout_s=2.0)
        except RetrieverStartError:
            return False
        return True

    with managed_process(
        cmd,
        name=f"retriever at {retrieve_url}",
        log_path=log_path,
        healthy=healthy,
        startup_timeout_s=startup_timeout_s,
        stop_grace_s=stop_grace_s,
        env=env,
        error=RetrieverStartError,
    ):
        yield retrieve_url
