"""searchr1.data against a local server that speaks the HF hub protocol (HF_ENDPOINT)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hubserver import HubServer

from searchr1.data import DataError, make_row, prepare_data
from searchr1.prompt import make_prompt

REPO = "PeterJinGo/nq_hotpotqa_train"


def _parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    return buf.getvalue()


def _hub_rows(n_nq: int, n_hp: int, split: str) -> list[dict]:
    rows = []
    for i in range(n_nq + n_hp):
        src = "nq" if i < n_nq else "hotpotqa"
        row = make_row(f"question {i}", [f"answer {i}"], data_source=src, split=split, index=i, qid="x")
        del row["id"], row["question"]  # the hub files have only the Search-R1 columns
        rows.append(row)
    return rows


def _download(hub: HubServer, dest: Path, files: list[str], sha256: dict | None = None) -> subprocess.CompletedProcess:
    # A fresh process, as in the workflow: huggingface_hub reads HF_ENDPOINT when it is imported.
    code = (
        "import json,sys; from pathlib import Path; from searchr1.data import download_files; "
        f"out = download_files({REPO!r}, {files!r}, dest_dir=Path({str(dest)!r}), revision='main', "
        f"sha256={sha256!r}); print(json.dumps({{k: str(v) for k, v in out.items()}}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=hub.client_env(), capture_output=True, text=True, timeout=120
    )


@pytest.fixture()
def hub():
    with HubServer() as server:
        server.state.add(
            "dataset",
            REPO,
            {
                "train.parquet": _parquet_bytes(_hub_rows(5, 3, "train")),
                "test.parquet": _parquet_bytes(_hub_rows(4, 6, "test")),
            },
        )
        yield server


def test_download_verifies_and_records_lock(hub, tmp_path):
    res = _download(hub, tmp_path, ["train.parquet", "test.parquet"])
    assert res.returncode == 0, res.stderr
    paths = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(paths["train.parquet"]).read_bytes() == hub.state.repos[("dataset", REPO)].files["train.parquet"]
    lock = json.loads((tmp_path / "download-lock.json").read_text())
    entry = lock[f"dataset:{REPO}/train.parquet"]
    assert entry["commit"] == hub.state.repos[("dataset", REPO)].commit and len(entry["sha256"]) == 64
    # A second run trusts the verified, untouched file and downloads nothing.
    n_before = sum(1 for m, *_ in hub.state.requests if m == "GET")
    assert _download(hub, tmp_path, ["train.parquet", "test.parquet"]).returncode == 0
    assert sum(1 for m, *_ in hub.state.requests if m == "GET") == n_before


def test_corrupt_download_is_refetched(hub, tmp_path):
    hub.state.corrupt["test.parquet"] = 1
    res = _download(hub, tmp_path, ["test.parquet"])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "test.parquet").read_bytes() == hub.state.repos[("dataset", REPO)].files["test.parquet"]


def test_persistently_corrupt_download_fails_and_is_removed(hub, tmp_path):
    hub.state.corrupt["test.parquet"] = 5
    res = _download(hub, tmp_path, ["test.parquet"])
    assert res.returncode != 0
    assert "does not match" in res.stderr and "test.parquet" in res.stderr
    assert not (tmp_path / "test.parquet").exists()


def test_truncated_download_is_never_used(hub, tmp_path):
    hub.state.truncate["train.parquet"] = 1
    res = _download(hub, tmp_path, ["train.parquet"])
    good = hub.state.repos[("dataset", REPO)].files["train.parquet"]
    if res.returncode == 0:  # huggingface_hub resumed the cut transfer, or we re-fetched it
        assert (tmp_path / "train.parquet").read_bytes() == good
    else:  # the interrupted download surfaced as an error; a rerun must then complete it
        assert not (tmp_path / "train.parquet").exists() or (tmp_path / "train.parquet").read_bytes() == good
        assert _download(hub, tmp_path, ["train.parquet"]).returncode == 0
        assert (tmp_path / "train.parquet").read_bytes() == good


def test_configured_sha256_mismatch_is_an_error(hub, tmp_path):
    res = _download(hub, tmp_path, ["train.parquet"], sha256={"train.parquet": "0" * 64})
    assert res.returncode != 0 and "train.parquet" in res.stderr


def test_lock_detects_moved_revision(hub, tmp_path):
    assert _download(hub, tmp_path, ["train.parquet"]).returncode == 0
    repo = hub.state.repos[("dataset", REPO)]
    repo.commit = "f" * 40
    repo.files["train.parquet"] = _parquet_bytes(_hub_rows(6, 3, "train"))
    os.utime(tmp_path / "train.parquet", (0, 0))  # force re-verification
    res = _download(hub, tmp_path, ["train.parquet"])
    assert res.returncode != 0 and "now resolves to commit" in res.stderr


def _write_raw(tmp_path: Path, n_nq: int, n_hp: int) -> tuple[Path, Path]:
    train, test = tmp_path / "train_raw.parquet", tmp_path / "test_raw.parquet"
    pd.DataFrame(_hub_rows(5, 3, "train")).to_parquet(train, index=False)
    pd.DataFrame(_hub_rows(n_nq, n_hp, "test")).to_parquet(test, index=False)
    return train, test


SPLITS = {
    "nq_test": {"data_source": "nq", "expected_rows": 4},
    "hotpotqa_test": {"data_source": "hotpotqa", "expected_rows": 6},
}


def test_prepare_splits_by_data_source(tmp_path):
    train, test = _write_raw(tmp_path, 4, 6)
    outs = {s: tmp_path / f"{s}.parquet" for s in SPLITS}
    counts = prepare_data(train, test, out_train=tmp_path / "train.parquet", split_outputs=outs, splits=SPLITS)
    assert counts == {"train": 8, "nq_test": 4, "hotpotqa_test": 6}
    nq = pd.read_parquet(outs["nq_test"])
    assert set(nq["data_source"]) == {"nq"} and nq["id"].is_unique
    assert nq.iloc[0]["prompt"][0]["content"] == make_prompt(nq.iloc[0]["question"])
    assert list(nq.iloc[0]["reward_model"]["ground_truth"]["target"]) == ["answer 0"]
    tr = pd.read_parquet(tmp_path / "train.parquet")
    assert {"prompt", "reward_model", "id", "question"} <= set(tr.columns)


def test_prepare_rejects_wrong_row_count(tmp_path):
    train, test = _write_raw(tmp_path, 3, 6)
    outs = {s: tmp_path / f"{s}.parquet" for s in SPLITS}
    with pytest.raises(DataError, match="nq_test.*3 rows.*expected 4"):
        prepare_data(train, test, out_train=tmp_path / "train.parquet", split_outputs=outs, splits=SPLITS)


def test_prepare_rejects_missing_columns(tmp_path):
    train, test = _write_raw(tmp_path, 4, 6)
    pd.DataFrame({"data_source": ["nq"]}).to_parquet(test, index=False)
    with pytest.raises(DataError, match="missing Search-R1 columns"):
        prepare_data(train, test, out_train=tmp_path / "t.parquet", split_outputs={}, splits={})
