"""The `searchr1` command: the installed entry point and its subcommands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from searchr1 import provenance
from searchr1.cli import main

BIN = Path(sys.executable).parent / "searchr1"


def test_entry_point_is_installed_and_lists_commands():
    exe = str(BIN) if BIN.exists() else shutil.which("searchr1")
    assert exe, "the searchr1 console script is not installed (pyproject [project.scripts])"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "searchr1 retrieval" in res.stdout and "provenance" in res.stdout


def test_config_prints_the_merged_config_and_names_a_bad_key(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("train: {lr: 3.0e-4}\n")
    assert main(["config", str(good)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 3e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lrr: 1}\n")
    assert main(["config", str(bad)]) == 2
    assert "train.lrr" in capsys.readouterr().err


def test_provenance_prints_a_record(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"provenance": provenance.make("report", {"scale": "toy"})}))
    assert main(["provenance", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["settings"] == {"scale": "toy"}
    (tmp_path / "y.json").write_text("{}")
    assert main(["provenance", str(tmp_path / "y.json")]) == 1


def test_unknown_command_is_refused():
    assert main(["unknown"]) == 2


def test_command_line_defaults_are_the_configs():
    """`serve`/`build-index` by hand use config.yaml's values, the toy commands config.toy.yaml's."""
    from helpers import config

    from searchr1.retrieval.__main__ import build_parser
    from searchr1.toy.__main__ import build_parser as toy_parser

    ret = config()["retriever"]
    a = build_parser().parse_args(["serve", "--corpus", "c", "--index", "i", "--encoder", "e"])
    assert (a.topk, a.topk_max, a.port, a.max_wait_ms, a.max_batch_size, a.query_prefix) == (
        ret["topk"],
        ret["topk_max"],
        ret["port"],
        ret["max_wait_ms"],
        ret["max_batch_size"],
        "query: ",
    )
    b = build_parser().parse_args(["build-index", "--corpus", "c", "--out", "o", "--encoder", "e"])
    assert (b.batch_size, b.shard_size) == (ret["index"]["build_batch_size"], ret["index"]["build_shard_size"])
    toy = config(toy=True)["toy"]
    w = toy_parser().parse_args(["warmstart", "--model", "m", "--world", "w", "--out-dir", "o"])
    assert (w.steps, w.batch_size, w.lr) == (
        toy["warm_start"]["steps"],
        toy["warm_start"]["batch_size"],
        toy["warm_start"]["lr"],
    )
