"""What made a result: the settings of its step, the code version, and the provenance of its inputs.

Every result file of the DAG carries a provenance record::

    {"step": "evaluate", "settings": {"agent.max_turns": 2, ...}, "operational": {"retriever.port": 0, ...},
     "settings_hash": "3f9c0a1b2c4d", "code": {"git": "903032f", "source_sha": "..."},
     "inputs": {"model": {...its provenance...}, ...}}

``settings`` are the result-affecting keys the step's rule declares (flattened, dotted); ``operational``
the declared keys that do not change the result (recorded, not hashed). ``inputs`` nests the records of
the inputs that carry one, so an RL evaluation knows the training settings of the model it scored.
:func:`check_consistent` walks such trees and names the first key that two of them set differently.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent
CHECKOUT = PACKAGE_ROOT.parent
MODEL_PROVENANCE = "searchr1_provenance.json"  # inside an HF model directory the DAG wrote
PARQUET_KEY = b"searchr1.provenance"  # parquet schema metadata


class MixedSettingsError(ValueError):
    """Results made under different values of the same setting were about to be put side by side."""


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def settings_hash(settings: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of the canonical JSON of ``{dotted key: value}``."""
    return hashlib.sha256(canonical(dict(settings)).encode()).hexdigest()[:12]


@lru_cache(maxsize=1)
def source_sha() -> str:
    """sha256 (12 hex) over the package's Python files and the workflow's rules and scripts: the code that
    made a result, also where there is no git checkout (a copied or installed workflow)."""
    digest = hashlib.sha256()
    files = sorted(PACKAGE_ROOT.rglob("*.py")) + sorted(PACKAGE_ROOT.rglob("*.yaml"))
    for extra in ("rules", "scripts"):
        folder = CHECKOUT / extra
        if folder.is_dir():
            files += sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(CHECKOUT) if path.is_relative_to(CHECKOUT) else path.name).encode())
        digest.update(b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@lru_cache(maxsize=1)
def git_version(root: Path = CHECKOUT) -> str | None:
    """``<short commit>``, with ``+dirty`` when tracked or unignored files differ from it; None outside git.

    Files the workflow writes (results/, logs/, benchmark TSVs, .snakemake/) are git-ignored, so a fresh
    clone that ran the DAG is not called dirty.
    """
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def code_version() -> dict[str, Any]:
    return {"git": git_version(), "source_sha": source_sha()}


def make(
    step: str,
    settings: Mapping[str, Any],
    operational: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """A provenance record (see the module docstring); inputs without a record are left out."""
    flat = json.loads(canonical(dict(settings)))
    return {
        "step": step,
        "settings": flat,
        "settings_hash": settings_hash(flat),
        "operational": json.loads(canonical(dict(operational or {}))),
        "code": code_version(),
        "inputs": {name: dict(rec) for name, rec in (inputs or {}).items() if rec},
    }


# --- reading records back -----------------------------------------------------------------------------


def of_json(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data.get("provenance") if isinstance(data, dict) else None


def of_model_dir(path: str | Path) -> dict[str, Any] | None:
    return of_json(Path(path) / MODEL_PROVENANCE)


def of_parquet(path: str | Path) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        return None
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PARQUET_KEY)
    return json.loads(raw) if raw else None


def of_path(path: str | Path) -> dict[str, Any] | None:
    """The record of any DAG result: a JSON file's ``provenance``, a parquet's metadata, a model dir's file."""
    path = Path(path)
    if path.is_dir():
        return of_model_dir(path)
    if path.suffix == ".parquet":
        return of_parquet(path)
    if path.suffix == ".json":
        return of_json(path)
    meta = path.with_name(path.name + ".meta.json")  # an index: its meta file holds the record
    return of_json(meta) if meta.is_file() else None


def write_model_record(model_dir: str | Path, record: Mapping[str, Any]) -> None:
    from searchr1.fsutil import write_json_atomic

    write_json_atomic(Path(model_dir) / MODEL_PROVENANCE, {"provenance": dict(record)})


# --- comparing records ---------------------------------------------------------------------------------


def walk(record: Mapping[str, Any], source: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """(where, record) for the record and every input record under it."""
    yield source, record
    for name, sub in (record.get("inputs") or {}).items():
        if isinstance(sub, Mapping):
            yield from walk(sub, f"{source} <- {name}")


def check_consistent(records: Mapping[str, Mapping[str, Any] | None], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """Raise :class:`MixedSettingsError` naming the key if two records (or their inputs) disagree on it.

    ``records`` maps a label (a file) to its provenance; keys in ``ignore`` (and keys under them) are not
    compared (what differs by design: an experiment's own settings). Returns the merged ``{key: value}``.
    """
    ignored = tuple(ignore)
    seen: dict[str, tuple[str, Any]] = {}
    for label, record in records.items():
        if not record:
            continue
        for where, rec in walk(record, label):
            for key, value in (rec.get("settings") or {}).items():
                if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in ignored):
                    continue
                if key in seen and canonical(seen[key][1]) != canonical(value):
                    first_where, first_value = seen[key]
                    raise MixedSettingsError(
                        f"results made under different settings of '{key}' would be put side by side: "
                        f"{canonical(first_value)} in {first_where} but {canonical(value)} in {where}; rerun the "
                        "steps that made the stale one (snakemake --list-changes params names them)"
                    )
                seen.setdefault(key, (where, value))
    return {key: value for key, (_, value) in sorted(seen.items())}
