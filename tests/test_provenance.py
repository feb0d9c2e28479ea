"""Provenance records: hashing, reading back from every kind of result, the consistency check, code version."""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas as pd
import pytest
from helpers import ROOT

from searchr1 import provenance
from searchr1.data import _write_parquet_atomic


def test_settings_hash_is_canonical():
    a = provenance.settings_hash({"train.lr": 1e-6, "seed": 42})
    assert a == provenance.settings_hash({"seed": 42, "train.lr": 1e-6}) and len(a) == 12
    assert a != provenance.settings_hash({"seed": 42, "train.lr": 2e-6})


def test_records_are_read_back_from_json_parquet_model_dirs_and_index_meta(tmp_path):
    rec = provenance.make("prepare_data", {"data.splits": {"nq_test": {"expected_rows": 3}}})
    parquet = tmp_path / "s.parquet"
    _write_parquet_atomic(pd.DataFrame({"x": [1, 2]}), parquet, rec)
    assert provenance.of_path(parquet) == rec and pd.read_parquet(parquet)["x"].tolist() == [1, 2]
    model = tmp_path / "model"
    model.mkdir()
    provenance.write_model_record(model, rec)
    assert provenance.of_path(model) == rec
    index = tmp_path / "index.faiss"
    index.write_bytes(b"")
    (tmp_path / "index.faiss.meta.json").write_text(json.dumps({"n": 1, "provenance": rec}))
    assert provenance.of_path(index) == rec
    assert provenance.of_path(tmp_path / "missing.json") is None


def test_check_consistent_walks_inputs_and_names_the_key():
    train = provenance.make("train", {"train.lr": 1e-6})
    export = provenance.make("export_rl", {}, inputs={"final": train})
    other = provenance.make("train", {"train.lr": 2e-6})
    merged = provenance.check_consistent(
        {"a.json": provenance.make("evaluate", {"seed": 1}, inputs={"model": export}), "final.json": train}
    )
    assert merged == {"seed": 1, "train.lr": 1e-6}
    with pytest.raises(provenance.MixedSettingsError, match=r"'train\.lr'.*a\.json <- model <- final"):
        provenance.check_consistent(
            {"final.json": other, "a.json": provenance.make("evaluate", {}, inputs={"model": export})}
        )


def test_operational_settings_are_recorded_but_not_hashed():
    a = provenance.make("evaluate", {"seed": 1}, {"retriever.port": 1})
    b = provenance.make("evaluate", {"seed": 1}, {"retriever.port": 2})
    assert a["settings_hash"] == b["settings_hash"] and a["operational"] == {"retriever.port": 1}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_files_the_workflow_writes_do_not_make_the_tree_dirty(tmp_path):
    repo = tmp_path / "clone"
    repo.mkdir()
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    (repo / "Snakefile").write_text("# workflow\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    for written in (
        "logs/benchmarks/train.tsv",
        "logs/benchmarks/evaluate/rl_nq_test.tsv",
        "logs/train.log",
        "results/headline.md",
        ".snakemake/log/x.log",
        "data/toy/corpus/corpus.jsonl",
    ):
        (repo / written).parent.mkdir(parents=True, exist_ok=True)
        (repo / written).write_text("x")
    provenance.git_version.cache_clear()
    assert not provenance.git_version(repo).endswith("+dirty")
    (repo / "Snakefile").write_text("# changed\n")
    provenance.git_version.cache_clear()
    assert provenance.git_version(repo).endswith("+dirty")
    provenance.git_version.cache_clear()
