"""Command line of the retriever: ``python -m searchr1.retrieval {serve,build-index,offsets,write-meta,
download-corpus,download-index} ...``. Its benchmarks live beside the package, in benchmarks/retriever/."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("searchr1.retrieval")


def recipe() -> dict:
    """The seed recipe's retriever settings (the packaged config.yaml): the defaults of the flags below that the
    workflow config also holds, so a server started by hand and one a job starts agree."""
    from searchr1.config import default_config

    return default_config()["retriever"]


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    enc = recipe()["encoder"]
    p.add_argument("--encoder", required=True, help="HF encoder directory (e.g. intfloat/e5-base-v2 snapshot)")
    p.add_argument("--query-prefix", default=enc["query_prefix"], help="prepended to every query (e5: 'query: ')")
    p.add_argument(
        "--passage-prefix", default=enc["passage_prefix"], help="prepended to every passage (e5: 'passage: ')"
    )
    p.add_argument("--pooling", choices=["mean", "cls"], default=enc["pooling"])
    p.add_argument("--no-normalize", action="store_true", help="skip the L2 normalisation of embeddings")
    p.add_argument("--max-length", type=int, default=enc["max_length"], help="max tokens per text")
    p.add_argument(
        "--fp16",
        choices=["auto", "on", "off"],
        default="auto" if enc["fp16"] else "off",
        help="auto: fp16 on CUDA only",
    )
    p.add_argument("--device", default=None, help="torch device for the encoder (default: cuda if present)")
    p.add_argument("--encoder-batch-size", type=int, default=256)
    p.add_argument(
        "--cuda-graphs",
        choices=["auto", "on", "off"],
        default="auto",
        help="encode by replaying CUDA graphs of the forward (auto: on CUDA; falls back to eager if a capture fails)",
    )
    p.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="encode under bf16 autocast on CPU (faster on avx512_bf16 CPUs; default exact fp32)",
    )


def _make_encoder(a: argparse.Namespace):
    from searchr1.retrieval.encoder import Encoder

    return Encoder(
        a.encoder,
        query_prefix=a.query_prefix,
        passage_prefix=a.passage_prefix,
        pooling=a.pooling,
        normalize=not a.no_normalize,
        max_length=a.max_length,
        fp16={"auto": None, "on": True, "off": False}[a.fp16],
        device=a.device,
        batch_size=a.encoder_batch_size,
        cpu_bf16=a.cpu_bf16,
        cuda_graphs={"auto": None, "on": True, "off": False}[a.cuda_graphs],
    )


def _which(module: str) -> str:
    import importlib.util

    return module if importlib.util.find_spec(module) is not None else f"no {module}"


def _add_http_limit_args(p: argparse.ArgumentParser) -> None:
    from searchr1.retrieval.server import DEFAULT_MAX_BATCH_CHARS, HttpLimits

    d = HttpLimits()  # the defaults live in the server, in one place
    p.add_argument(
        "--max-batch-chars",
        type=int,
        default=DEFAULT_MAX_BATCH_CHARS,
        help="most query characters per encode+search call; larger requests are served in slices "
        "interleaved with other requests",
    )
    p.add_argument(
        "--max-header-bytes", type=int, default=d.max_header_bytes, help="request line + headers, bytes (431 beyond)"
    )
    p.add_argument("--max-headers", type=int, default=d.max_headers, help="header fields per request (431 beyond)")
    p.add_argument(
        "--keep-alive-timeout-s",
        type=float,
        default=d.keep_alive_timeout_s,
        help="close a connection idle this long with no request in progress",
    )
    p.add_argument(
        "--header-timeout-s",
        type=float,
        default=d.header_timeout_s,
        help="a request's headers must be complete this long after its first byte (408)",
    )
    p.add_argument(
        "--body-timeout-s",
        type=float,
        default=d.body_timeout_s,
        help="a request's body must be complete this long after its headers (408)",
    )
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=d.shutdown_grace_s,
        help="on SIGTERM/SIGINT in-flight requests get this long; the process is gone 1 s later "
        "at most; a second signal exits at once",
    )


def cmd_serve(a: argparse.Namespace) -> int:
    from searchr1.retrieval.guarded_protocol import UntestedVersionError, check_versions
    from searchr1.retrieval.server import HttpLimits, RetrieverServer, bind_socket, create_app

    try:  # before anything is loaded: the connection limits run on the tested uvicorn/httptools only
        check_versions()
    except UntestedVersionError as e:
        log.error("refusing to start: %s", e)
        return 2
    try:
        http_limits = HttpLimits(
            max_header_bytes=a.max_header_bytes,
            max_headers=a.max_headers,
            keep_alive_timeout_s=a.keep_alive_timeout_s,
            header_timeout_s=a.header_timeout_s,
            body_timeout_s=a.body_timeout_s,
            shutdown_grace_s=a.shutdown_grace_s,
        )
        if a.max_batch_chars <= 0:
            raise ValueError(f"--max-batch-chars must be > 0, got {a.max_batch_chars}")
    except ValueError as e:
        log.error("refusing to start: %s", e)
        return 2
    # The port first: a busy one fails in milliseconds, not after loading the encoder and the index.
    try:
        sock = bind_socket(a.host, a.port)
    except OSError as e:
        log.error("refusing to start: %s", e)
        return 2

    from searchr1.retrieval.corpus import CorpusStore
    from searchr1.retrieval.index import IndexPairError, check_pair, load_backend

    try:
        meta = check_pair(a.index, a.corpus)
    except IndexPairError as e:
        log.error("refusing to start: %s", e)
        return 2
    log.info("index %s matches corpus %s (%d passages, dim %d)", a.index, a.corpus, meta["n"], meta["dim"])
    corpus = CorpusStore(a.corpus)
    encoder = _make_encoder(a)
    backend = load_backend(a.index, a.backend, device=a.index_device, mmap=a.mmap)
    if backend.dim != encoder.dim:
        log.error(
            "refusing to start: index %s has dim %d but encoder %s gives %d",
            a.index,
            backend.dim,
            a.encoder,
            encoder.dim,
        )
        return 2
    from searchr1.retrieval.frontends import resolve_http_workers

    try:
        http_workers = resolve_http_workers(a.http_workers, backend)
    except ValueError as e:
        log.error("refusing to start: %s", e)
        return 2
    pipeline = None if a.pipeline == "auto" else int(a.pipeline)
    if http_workers > 1:
        return _serve_multiprocess(a, sock, corpus, encoder, backend, http_limits, http_workers, pipeline)
    app = create_app(
        corpus,
        encoder,
        backend,
        pipeline=pipeline,
        topk_max=a.topk_max,
        default_topk=a.topk,
        max_queries=a.max_queries,
        max_query_chars=a.max_query_chars,
        max_body_bytes=a.max_body_bytes,
        max_batch_size=a.max_batch_size,
        max_wait_ms=a.max_wait_ms,
        batching=not a.no_batching,
        max_batch_chars=a.max_batch_chars,
        http_limits=http_limits,
    )
    # uvicorn's "auto" loop picks uvloop when installed (a pinned dependency), and the server runs the
    # httptools parser (pinned too): several times less CPU per request than asyncio + the pure-Python h11.
    log.info(
        "serving on http://%s:%d/retrieve (backend %s, batching %s, loop %s, http %s)",
        a.host,
        a.port,
        backend.name,
        not a.no_batching,
        _which("uvloop"),
        _which("httptools"),
    )
    # SIGTERM/SIGINT: graceful shutdown bounded by --shutdown-grace-s; a second signal exits at once.
    RetrieverServer(app, sock, log_level=a.log_level).run()
    return 0


def _serve_multiprocess(a, sock, corpus, encoder, backend, http_limits, http_workers: int, pipeline: int | None) -> int:
    """``--http-workers N`` > 1: N HTTP front-end processes, this process encodes and searches."""
    from searchr1.retrieval.frontends import MultiProcessServer, rebind_group
    from searchr1.retrieval.server import BatchingWorker, Limits, index_info

    if len(corpus) != backend.ntotal:
        log.error(
            "refusing to start: corpus %s has %d rows but the index has %d vectors",
            a.corpus,
            len(corpus),
            backend.ntotal,
        )
        return 2
    info = index_info(corpus, encoder, backend)
    corpus.close()  # the front ends look the passages up
    try:
        sockets = rebind_group(sock, http_workers)
    except OSError as e:
        log.error("refusing to start: %s", e)
        return 2
    if pipeline is None:  # measured on an H200 at 21M: two batches in flight were 6% slower (docs/retriever.md)
        pipeline = 1
    worker = BatchingWorker(
        None,
        encoder,
        backend,
        max_batch_size=a.max_batch_size,
        max_wait_ms=a.max_wait_ms,
        batching=not a.no_batching,
        max_batch_chars=a.max_batch_chars,
        pipeline=pipeline,
    )
    limits = Limits(
        topk_max=a.topk_max,
        default_topk=a.topk,
        max_queries=a.max_queries,
        max_query_chars=a.max_query_chars,
        max_body_bytes=a.max_body_bytes,
    )
    log.info(
        "serving on http://%s:%d/retrieve (backend %s, %d HTTP front ends, %d batch(es) in flight)",
        a.host,
        a.port,
        backend.name,
        http_workers,
        pipeline,
    )
    return MultiProcessServer(
        worker,
        corpus_path=a.corpus,
        info=info,
        limits=limits,
        http_limits=http_limits,
        sockets=sockets,
        log_level=a.log_level,
    ).run()


def cmd_build_index(a: argparse.Namespace) -> int:
    from searchr1.retrieval.index import build_index

    out = build_index(
        a.corpus,
        _make_encoder(a),
        a.out,
        batch_size=a.batch_size,
        shard_size=a.shard_size,
        metric=a.metric,
        work_dir=a.work_dir,
        keep_work=a.keep_work,
    )
    print(out)
    return 0


def cmd_offsets(a: argparse.Namespace) -> int:
    from searchr1.retrieval.corpus import build_offsets

    print(build_offsets(a.corpus, force=a.force))
    return 0


def cmd_write_meta(a: argparse.Namespace) -> int:
    from searchr1.retrieval.index import write_index_meta

    encoder = (
        {"name": a.encoder_name, "query_prefix": a.query_prefix, "passage_prefix": a.passage_prefix}
        if a.encoder_name
        else None
    )
    print(write_index_meta(a.index, a.corpus, encoder=encoder))
    return 0


def _sha_map(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        name, sep, digest = pair.partition("=")
        if not sep:
            raise SystemExit(f"--sha256 wants NAME=HEX, got {pair!r}")
        out[name] = digest
    return out


def cmd_download_corpus(a: argparse.Namespace) -> int:
    from searchr1.retrieval.download import download_corpus

    out = download_corpus(
        a.repo_id,
        a.filename,
        revision=a.revision,
        dest_dir=Path(a.dest_dir),
        out=Path(a.out),
        sha256=_sha_map(a.sha256),
        delete_compressed=a.delete_compressed,
    )
    print(out)
    return 0


def cmd_download_index(a: argparse.Namespace) -> int:
    from searchr1.retrieval.download import download_index

    encoder = {"name": a.encoder_name, "query_prefix": a.query_prefix, "passage_prefix": a.passage_prefix}
    out = download_index(
        a.repo_id,
        a.parts,
        revision=a.revision,
        dest_dir=Path(a.dest_dir),
        out=Path(a.out),
        corpus=Path(a.corpus),
        encoder=encoder,
        sha256=_sha_map(a.sha256),
        delete_parts=a.delete_parts,
    )
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m searchr1.retrieval", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    ret = recipe()

    p = sub.add_parser("serve", help="serve POST /retrieve and GET /health")
    p.add_argument("--corpus", required=True)
    p.add_argument("--index", required=True)
    _add_encoder_args(p)
    p.add_argument("--host", default=ret["host"])
    p.add_argument("--port", type=int, default=ret["port"])
    p.add_argument("--backend", choices=["auto", "faiss", "faiss_gpu", "torch"], default=ret["backend"])
    p.add_argument("--index-device", default=None, help="torch backend device (default: all GPUs, else cpu)")
    p.add_argument("--mmap", action="store_true", help="memory-map the faiss index (fast start, cold first queries)")
    p.add_argument(
        "--max-batch-size", type=int, default=ret["max_batch_size"], help="most queries per encode+search call"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=ret["max_wait_ms"],
        help="under load, how long a batch waits at most to fill up (ms)",
    )
    p.add_argument("--no-batching", action="store_true", help="one request per encode+search call (baseline)")
    from searchr1.retrieval.frontends import GPU_HTTP_WORKERS

    p.add_argument(
        "--http-workers",
        default="auto",
        help="HTTP front-end processes feeding this process's encoder and index (N > 1: the "
        f"multi-process server); auto: 1 when the index is searched on the CPU, {GPU_HTTP_WORKERS} on GPUs",
    )
    p.add_argument(
        "--pipeline",
        choices=["auto", "1", "2"],
        default="auto",
        help="batches in flight (2: encode one while the other searches); auto: 1 (measured faster)",
    )
    p.add_argument(
        "--topk", type=int, default=ret["topk"], help="passages for a request that names no topk (Search-R1's --topk)"
    )
    p.add_argument("--topk-max", type=int, default=ret["topk_max"])
    from searchr1.retrieval.server import Limits

    # the defaults live in the server, in one place
    p.add_argument("--max-queries", type=int, default=Limits.max_queries, help="most queries per request")
    p.add_argument("--max-query-chars", type=int, default=Limits.max_query_chars)
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    _add_http_limit_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("build-index", help="encode a corpus into a faiss flat index (resumable)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    _add_encoder_args(p)
    p.add_argument("--batch-size", type=int, default=ret["index"]["build_batch_size"], help="passages per encoder call")
    p.add_argument(
        "--shard-size", type=int, default=ret["index"]["build_shard_size"], help="passages per resumable shard"
    )
    p.add_argument("--metric", choices=["ip", "l2"], default="ip")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--keep-work", action="store_true")
    p.set_defaults(func=cmd_build_index)

    p = sub.add_parser("offsets", help="build <corpus>.offsets.npy")
    p.add_argument("corpus")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_offsets)

    p = sub.add_parser("write-meta", help="record a (downloaded) index's corpus fingerprint")
    p.add_argument("--index", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--encoder-name", default=None)
    p.add_argument("--query-prefix", default=ret["encoder"]["query_prefix"])
    p.add_argument("--passage-prefix", default=ret["encoder"]["passage_prefix"])
    p.set_defaults(func=cmd_write_meta)

    p = sub.add_parser("download-corpus", help="download + decompress a Search-R1 corpus and build its offsets")
    p.add_argument("--repo-id", default=ret["corpus"]["repo"])
    p.add_argument("--revision", required=True, help="pinned commit of the dataset repo")
    p.add_argument("--filename", default=ret["corpus"]["file"])
    p.add_argument("--dest-dir", required=True, help="where the downloaded file goes")
    p.add_argument("--out", required=True, help="the decompressed corpus.jsonl")
    p.add_argument("--sha256", nargs="*", help="NAME=HEX expected digests")
    p.add_argument("--delete-compressed", action="store_true")
    p.set_defaults(func=cmd_download_corpus)

    p = sub.add_parser("download-index", help="download index parts, concatenate them, write the metadata")
    p.add_argument("--repo-id", default=ret["index"]["repo"])
    p.add_argument("--revision", required=True)
    p.add_argument("--parts", nargs="+", default=ret["index"]["parts"])
    p.add_argument("--dest-dir", required=True)
    p.add_argument("--out", required=True, help="the concatenated index (e5_Flat.index)")
    p.add_argument("--corpus", required=True, help="the corpus this index belongs to (for the fingerprint)")
    p.add_argument("--encoder-name", default=ret["encoder"]["repo"])
    p.add_argument("--query-prefix", default=ret["encoder"]["query_prefix"])
    p.add_argument("--passage-prefix", default=ret["encoder"]["passage_prefix"])
    p.add_argument("--sha256", nargs="*", help="NAME=HEX expected digests")
    p.add_argument("--delete-parts", action="store_true")
    p.set_defaults(func=cmd_download_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    return int(a.func(a) or 0)


if __name__ == "__main__":
    sys.exit(main())
