"""Search-R1's own retrieval server, run from a checkout of its source, for the CPU benchmark's comparison.

``python benchmarks/retriever/peer.py --source DIR --port P [--device cpu] -- <its own arguments>`` runs
``DIR/search_r1/search/retrieval_server.py`` unmodified as ``__main__`` (``runpy``), after three
adjustments made from outside, each because its ``__main__`` hard-codes something a benchmark on a
CPU machine cannot use:

- ``uvicorn.run`` is called with ``host="127.0.0.1"`` and ``port=P``: it hard-codes ``0.0.0.0:8000``
  (every interface, a fixed port);
- ``--device cpu``: ``Module.cuda()`` and ``Tensor.cuda()`` return the object unchanged, so its encoder
  and its inputs stay on the CPU (it calls ``.cuda()`` unconditionally);
- ``--device cpu``: ``Module.half()`` returns the model unchanged, so the encoder runs in fp32 like ours
  on a CPU (its ``__main__`` sets fp16, which is meant for a GPU).

Everything else is its code: FastAPI with a pydantic request model, a synchronous endpoint (run by
uvicorn in its thread pool), one encode + faiss ``IndexFlat`` search per request, passages from a
``datasets`` Arrow table. It needs ``faiss-cpu`` and ``datasets`` installed. Nothing of it is copied
into this project; the source is read from ``DIR`` at run time.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

SERVER = Path("search_r1/search/retrieval_server.py")


class PeerSourceError(FileNotFoundError):
    """The given path is not a Search-R1 checkout."""


def server_file(source: str | os.PathLike) -> Path:
    path = Path(source) / SERVER
    if not path.is_file():
        raise PeerSourceError(
            f"{path} not found: --peer-source must be a checkout of Search-R1 (PeterGriffinJin/Search-R1)"
        )
    return path


def peer_command(
    source: str | os.PathLike,
    *,
    index: str | os.PathLike,
    corpus: str | os.PathLike,
    encoder: str | os.PathLike,
    retriever_name: str,
    port: int,
    topk: int = 3,
    device: str = "cpu",
) -> list[str]:
    """The command that serves ``index``/``corpus`` with Search-R1's server on 127.0.0.1:``port``.

    This file is run by its path: it imports nothing of the checkout, so it starts from any directory."""
    server_file(source)
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--source",
        str(source),
        "--port",
        str(port),
        "--device",
        device,
        "--",
        "--index_path",
        str(index),
        "--corpus_path",
        str(corpus),
        "--topk",
        str(topk),
        "--retriever_name",
        retriever_name,
        "--retriever_model",
        str(encoder),
    ]


@contextmanager
def managed_peer(
    source: str | os.PathLike,
    *,
    index: str | os.PathLike,
    corpus: str | os.PathLike,
    encoder: str | os.PathLike,
    retriever_name: str,
    log_path: str | os.PathLike,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 1800.0,
) -> Iterator[str]:
    """Start Search-R1's server, wait until it answers (its OpenAPI page: it has no /health), yield the
    ``/retrieve`` URL, stop its process group on every way out."""
    from searchr1.process import StartError, free_port, http_ok, managed_process

    port = port or free_port()
    cmd = peer_command(source, index=index, corpus=corpus, encoder=encoder, retriever_name=retriever_name, port=port)
    base = f"http://127.0.0.1:{port}"
    with managed_process(
        cmd,
        name=f"Search-R1 retrieval server at {base}",
        log_path=log_path,
        healthy=lambda: http_ok(base + "/openapi.json"),
        startup_timeout_s=startup_timeout_s,
        env=env,
        error=StartError,
    ):
        yield base + "/retrieve"


def _loopback(port: int) -> None:
    import uvicorn

    run = uvicorn.run

    def run_on_loopback(app, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        kwargs.update(host="127.0.0.1", port=port, log_level="warning")
        return run(app, **kwargs)

    uvicorn.run = run_on_loopback


def _cpu_only() -> None:
    import torch

    def same(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return self

    torch.nn.Module.cuda = same
    torch.Tensor.cuda = same
    torch.nn.Module.half = same


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python benchmarks/retriever/peer.py", description=__doc__)
    p.add_argument("--source", required=True, help="a checkout of Search-R1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", choices=["cpu", "as-is"], default="cpu")
    a = p.parse_args(ours)
    path = server_file(a.source)
    _loopback(a.port)
    if a.device == "cpu":
        _cpu_only()
    sys.argv = [str(path), *theirs]
    # Run by its path, this file's folder is sys.path[0]: drop it, so no benchmark module shadows an import of theirs.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.path.insert(0, str(Path(a.source).resolve()))
    runpy.run_path(str(path), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
