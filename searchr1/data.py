"""QA data: verified, resumable downloads from the HF hub, and the slime-ready parquet files.

Downloads go through ``huggingface_hub`` (which resumes ``.incomplete`` files and honours ``HF_ENDPOINT``).
On top of it we verify every file's sha256 — against the config, against the hub's LFS etag (the sha256 of
an LFS file), and against the lock file written at the first download — so a corrupt or truncated file is
re-fetched, never used. The lock file also records the commit each revision resolved to: a rerun that
finds the hub moved on fails loudly instead of mixing two versions of the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchr1.fsutil import atomic_path, write_json_atomic
from searchr1.prompt import make_messages

if TYPE_CHECKING:  # pandas is imported where parquet files are made: a download job does not need it
    import pandas as pd

log = logging.getLogger(__name__)

LOCK_NAME = "download-lock.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    """A download could not be completed or verified."""


class DataError(ValueError):
    """QA data does not have the expected shape or size."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_lock(lock_path: Path) -> dict[str, Any]:
    if lock_path.exists():
        with open(lock_path, encoding="utf-8") as fh:
            return json.load(fh)
    return {}


def _lock_key(repo_type: str, repo_id: str, filename: str) -> str:
    return f"{repo_type}:{repo_id}/{filename}"


def _hub_sha256(repo_id: str, filename: str, repo_type: str, revision: str) -> tuple[str | None, str | None]:
    """(commit, sha256 if the hub publishes it) for one file; LFS etags are the content's sha256."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision))
    etag = (meta.etag or "").strip('"').lower()
    return meta.commit_hash, (etag if _SHA256_RE.match(etag) else None)


def download_files(
    repo_id: str,
    filenames: Iterable[str],
    *,
    dest_dir: Path,
    revision: str,
    repo_type: str = "dataset",
    sha256: Mapping[str, str] | None = None,
    lock_path: Path | None = None,
) -> dict[str, Path]:
    """Download ``filenames`` of a hub repo into ``dest_dir`` and verify them; return name -> local path.

    The expected sha256 of a file is, in order: ``sha256[name]``, the lock file's record, the hub's LFS
    etag. A file that fails verification is deleted and downloaded once more; a second failure raises
    :class:`DownloadError` naming the file and both digests. Interrupted downloads resume.
    """
    from huggingface_hub import hf_hub_download

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    lock_path = Path(lock_path) if lock_path else dest_dir / LOCK_NAME
    lock = _read_lock(lock_path)
    expected_cfg = dict(sha256 or {})
    out: dict[str, Path] = {}
    for name in filenames:
        key = _lock_key(repo_type, repo_id, name)
        record = lock.get(key, {})
        if record.get("revision") not in (None, revision):
            record = {}  # a different revision was asked for: nothing recorded applies
        local = dest_dir / name
        if (
            record
            and local.exists()
            and local.stat().st_size == record.get("size")
            and (int(local.stat().st_mtime) == record.get("mtime"))
        ):
            out[name] = local  # verified before and untouched since: skip re-hashing many GB
            continue
        commit, hub_sha = _hub_sha256(repo_id, name, repo_type, revision)
        if record.get("commit") and commit and record["commit"] != commit:
            raise DownloadError(
                f"{repo_id}@{revision} now resolves to commit {commit}, but {lock_path} recorded {record['commit']} "
                f"for {name}; pin the revision in the config or delete the lock entry to accept the new data"
            )
        expected = expected_cfg.get(name) or record.get("sha256") or hub_sha
        for attempt in (1, 2):
            path = Path(
                hf_hub_download(
                    repo_id,
                    name,
                    repo_type=repo_type,
                    revision=revision,
                    local_dir=dest_dir,
                    force_download=attempt > 1,
                )
            )
            actual = sha256_file(path)
            if expected is None or actual == expected:
                break
            log.warning("%s: sha256 %s != expected %s (attempt %d); re-downloading", path, actual, expected, attempt)
            path.unlink(missing_ok=True)
        else:
            raise DownloadError(
                f"{repo_id}/{name}@{revision}: sha256 {actual} does not match the expected {expected} after "
                f"a fresh download; the file was removed"
            )
        stat = path.stat()
        lock[key] = {
            "revision": revision,
            "commit": commit,
            "sha256": actual,
            "size": stat.st_size,
            "mtime": int(stat.st_mtime),
        }
        write_json_atomic(lock_path, lock)
        out[name] = path
    return out


def download_snapshot(
    repo_id: str,
    *,
    dest_dir: Path,
    revision: str,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
) -> Path:
    """Download a whole model repo (weights, config, tokenizer) into ``dest_dir``; resumable.

    ``huggingface_hub`` checks sizes and, for LFS weights, the sha256 it gets from the tree listing.
    """
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.txt", "*.model", "*.py"]
    path = snapshot_download(
        repo_id, repo_type=repo_type, revision=revision, local_dir=dest_dir, allow_patterns=patterns
    )
    if not any(Path(path).glob("*.safetensors")):
        raise DownloadError(f"{repo_id}@{revision}: no *.safetensors weights found in the snapshot at {path}")
    return Path(path)


MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.jinja")


def download_model(
    repo_id: str, *, dest_dir: Path, revision: str, lock_path: Path, allow_patterns: Iterable[str] = MODEL_PATTERNS
) -> Path:
    """Download an HF model repo (weights, config, tokenizer) file by file through :func:`download_files`:
    each file verified (sha256 against the lock file, else the hub's LFS etag) and its resolved commit and
    sha256 locked in ``lock_path``, so a rerun that finds the revision moved fails instead of mixing weights."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi

    patterns = list(allow_patterns)
    names = [
        name
        for name in HfApi().list_repo_files(repo_id, revision=revision, repo_type="model")
        if any(fnmatch(Path(name).name, p) for p in patterns)
    ]
    if not any(n.endswith(".safetensors") for n in names):
        raise DownloadError(f"{repo_id}@{revision}: no *.safetensors weights in the repo (files: {names})")
    download_files(repo_id, names, dest_dir=dest_dir, revision=revision, repo_type="model", lock_path=lock_path)
    return Path(dest_dir)


# --- Search-R1 rows --------------------------------------------------------------------------------------

ROW_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def make_row(question: str, answers: list[str], *, data_source: str, split: str, index: int, qid: str) -> dict:
    """One row in the Search-R1 schema (plus our ``id`` and ``question`` columns)."""
    return {
        "id": qid,
        "question": question,
        "data_source": data_source,
        "prompt": make_messages(question),
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": list(answers)}},
        "extra_info": {"split": split, "index": index},
    }


def golden_answers(row: Mapping[str, Any]) -> list[str]:
    target = row["reward_model"]["ground_truth"]["target"]
    if isinstance(target, str):
        return [target]
    return [str(t) for t in list(target)]


def question_of(row: Mapping[str, Any]) -> str:
    """The question of a row: our ``question`` column, else parsed back out of the prompt text."""
    if isinstance(row.get("question"), str):
        return row["question"]
    content = list(row["prompt"])[0]["content"]
    return content.rsplit("Question: ", 1)[-1].strip()


def _check_columns(df: pd.DataFrame, path: Path) -> None:
    missing = [c for c in ROW_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing Search-R1 columns {missing} (has {list(df.columns)})")


def _with_ids(df: pd.DataFrame, prefix: str) -> pd.DataFrame:
    df = df.copy()
    if "id" not in df.columns:
        df["id"] = [
            f"{src}-{(ei or {}).get('split', prefix)}-{(ei or {}).get('index', i)}"
            for i, (src, ei) in enumerate(zip(df["data_source"], df["extra_info"]))
        ]
    if "question" not in df.columns:
        df["question"] = [question_of(r) for r in df.to_dict("records")]
    if df["id"].duplicated().any():
        dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
        raise DataError(f"duplicate question id {dup!r} in the {prefix} data")
    return df


def _write_parquet_atomic(df: pd.DataFrame, path: Path, provenance: Mapping[str, Any] | None = None) -> None:
    """``df`` to ``path`` atomically; ``provenance`` goes into the schema metadata (searchr1.provenance)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from searchr1.provenance import PARQUET_KEY

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if provenance is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_KEY: json.dumps(provenance)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


FLASHRAG_SPLITS = ("test", "dev", "train")  # qa_search_test_merge.py's order of preference


def flashrag_rows(records: Iterable[Mapping[str, Any]], data_source: str) -> pd.DataFrame:
    """Search-R1 rows (the columns of the merged test file) from FlashRAG records {question, golden_answers},
    as qa_search_test_merge.py makes them: normalised question, its prompt, extra_info split 'test' and the
    record's position as index."""
    rows = []
    for index, record in enumerate(records):
        row = make_row(
            record["question"],
            list(record["golden_answers"]),
            data_source=data_source,
            split="test",
            index=index,
            qid="",
        )
        rows.append({c: row[c] for c in ROW_COLUMNS})
    import pandas as pd

    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def fetch_flashrag(
    data_source: str, *, repo_id: str, revision: str, dest_dir: Path, lock_path: Path
) -> tuple[pd.DataFrame, str] | None:
    """(rows, FlashRAG split used) of ``data_source`` from the hub dataset ``repo_id`` (``<source>/test.jsonl``,
    else dev, else train; downloaded, verified and locked), or None when the dataset has none of them."""
    from huggingface_hub import HfApi

    files = set(HfApi().list_repo_files(repo_id, revision=revision, repo_type="dataset"))
    for split in FLASHRAG_SPLITS:
        name = f"{data_source}/{split}.jsonl"
        if name in files:
            path = download_files(repo_id, [name], dest_dir=dest_dir, revision=revision, lock_path=lock_path)[name]
            with open(path, encoding="utf-8") as fh:
                records = [json.loads(line) for line in fh if line.strip()]
            return flashrag_rows(records, data_source), split
    return None


def prepare_data(
    train_raw: Path,
    test_raw: Path,
    *,
    out_train: Path,
    split_outputs: Mapping[str, Path],
    splits: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any] | None = None,
    extra_sources: Mapping[str, pd.DataFrame] | None = None,
) -> dict[str, int]:
    """Write the slime-ready training parquet and split the merged test set by ``data_source``; a source the
    test set lacks comes from ``extra_sources`` (Search-R1 rows built from FlashRAG: :func:`fetch_flashrag`).

    ``splits`` maps a split name to ``{"data_source": ..., "expected_rows": int | None}``; a row count that
    differs from the expected one is an error naming the split (a silently smaller eval set would make the
    headline table incomparable with the published numbers).
    """
    import pandas as pd

    train = pd.read_parquet(train_raw)
    _check_columns(train, Path(train_raw))
    test = pd.read_parquet(test_raw)
    _check_columns(test, Path(test_raw))
    counts = {"train": len(train)}
    _write_parquet_atomic(_with_ids(train, "train"), Path(out_train), provenance)
    test = _with_ids(test, "test")
    held = test["data_source"].value_counts().to_dict()
    for name, spec in splits.items():
        part = test[test["data_source"] == spec["data_source"]].reset_index(drop=True)
        if part.empty:
            built = (extra_sources or {}).get(spec["data_source"])
            if built is None:
                raise DataError(
                    f"split {name!r}: no rows with data_source={spec['data_source']!r} in {test_raw}, which holds "
                    f"{held} (data_source: rows), and FlashRAG has no test, dev or train file for it either"
                )
            part = _with_ids(built, "test")
        expected = spec["expected_rows"]
        if expected is not None and len(part) != expected:
            found = test["data_source"].value_counts().to_dict()
            raise DataError(
                f"split {name!r}: {len(part)} rows with data_source={spec['data_source']!r} in {test_raw}, "
                f"expected {expected} (data_source counts there: {found})"
            )
        _write_parquet_atomic(part, Path(split_outputs[name]), provenance)
        counts[name] = len(part)
    return counts
