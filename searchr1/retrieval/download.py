"""Fetch the retriever's published artifacts: the corpus (decompressed, with its offsets) and a prebuilt
index (parts concatenated, metadata fingerprinted against the corpus). Verified and resumable through
:func:`searchr1.data.download_files`; used by the DAG's download steps and by the command line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from searchr1.data import download_files


def download_corpus(
    repo_id: str,
    filename: str,
    *,
    revision: str,
    dest_dir: Path,
    out: Path,
    sha256: Mapping[str, str] | None = None,
    lock_path: Path | None = None,
    delete_compressed: bool = False,
) -> Path:
    """Download ``filename`` (a ``.jsonl`` or ``.jsonl.gz``), write it to ``out`` decompressed, and its offsets."""
    from searchr1.retrieval.corpus import build_offsets, decompress_gz
    from searchr1.retrieval.index import concat_parts

    paths = download_files(
        repo_id, [filename], dest_dir=Path(dest_dir), revision=revision, sha256=sha256, lock_path=lock_path
    )
    src, out = paths[filename], Path(out)
    if src.suffix == ".gz":
        decompress_gz(src, out)
        if delete_compressed:
            src.unlink()
    elif src.resolve() != out.resolve():
        concat_parts([src], out)  # a plain copy, atomic
    build_offsets(out)
    return out


def download_index(
    repo_id: str,
    parts: Sequence[str],
    *,
    revision: str,
    dest_dir: Path,
    out: Path,
    corpus: Path,
    encoder: Mapping[str, object],
    sha256: Mapping[str, str] | None = None,
    lock_path: Path | None = None,
    delete_parts: bool = False,
) -> Path:
    """Download the index ``parts``, concatenate them into ``out`` and write its metadata for ``corpus``."""
    from searchr1.retrieval.index import concat_parts, write_index_meta

    paths = download_files(
        repo_id, list(parts), dest_dir=Path(dest_dir), revision=revision, sha256=sha256, lock_path=lock_path
    )
    out = concat_parts([paths[p] for p in parts], out)
    write_index_meta(out, corpus, encoder=dict(encoder), source=f"hf:{repo_id}@{revision}")
    if delete_parts:
        for p in parts:
            paths[p].unlink()
    return Path(out)
