"""The toy world generator: determinism, splits, row schema, forbidden answers, corpus format."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import world_sizes

from searchr1.prompt import make_messages, normalize_question
from searchr1.reward import normalize_answer
from searchr1.toy.world import (
    FORBIDDEN_ANSWERS,
    WorldSizes,
    corpus_rows,
    first_names,
    load_world,
    make_world,
    split_questions,
    surnames,
    write_world,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_couples=60, n_test_couples=12, n_rl_couples=20, test_per_split=8, rl_questions=40)
FILES = ("corpus.jsonl", "train.parquet", "test.parquet", "world.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(7, out, WorldSizes(**TINY))
    return out


def write_world_in_fresh_process(out: Path, seed: int, hash_seed: str) -> None:
    code = (
        f"from searchr1.toy.world import WorldSizes, write_world; "
        f"write_world({seed}, {str(out)!r}, WorldSizes(**{TINY!r}))"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONHASHSEED=hash_seed),
        capture_output=True,
    )


def test_same_seed_same_bytes_in_fresh_processes(tmp_path, tiny):
    # Different hash seeds: any iteration over a set of strings would show up as different bytes.
    write_world_in_fresh_process(tmp_path / "a", 7, "1")
    write_world_in_fresh_process(tmp_path / "b", 7, "2")
    for name in FILES:
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b, name
        assert a == (tiny / name).read_bytes(), name  # and the same as in this process


def test_world_command_writes_the_same_world(tmp_path, tiny):
    """`python -m searchr1.toy world` with the sizes as flags (its main, in this process)."""
    from searchr1.toy.__main__ import main

    main(
        [
            "world",
            "--seed",
            "7",
            "--out-dir",
            str(tmp_path),
            "--couples",
            "60",
            "--test-couples",
            "12",
            "--rl-couples",
            "20",
            "--test-per-split",
            "8",
            "--rl-questions",
            "40",
        ]
    )
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (tiny / name).read_bytes(), name


def test_other_seed_other_world(tmp_path, tiny):
    write_world(8, tmp_path, WorldSizes(**TINY))
    assert (tmp_path / "corpus.jsonl").read_bytes() != (tiny / "corpus.jsonl").read_bytes()


def test_corpus_format_and_passages(tiny):
    world = load_world(tiny)
    lines = (tiny / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * TINY["n_couples"]
    names = set()
    for i, line in enumerate(lines):
        row = json.loads(line)
        assert set(row) == {"id", "contents"} and row["id"] == str(i)  # row i of the index = line i
        title, text = row["contents"].split("\n", 1)
        assert title.startswith('"') and title.endswith('"')
        name = title.strip('"')
        names.add(name)
        person = next(p for p in world.people if p.passage_id == row["id"])
        spouse = world.people[person.spouse]
        assert person.name == name
        assert text.startswith(f"{name} was born in {person.city}, where {name} works as ")
        assert f"{name} is married to {spouse.name}." in text  # both spouses named
    assert len(names) == len(lines)  # names are unique


def test_couples_are_consistent(tiny):
    world = load_world(tiny)
    for couple in range(TINY["n_couples"]):
        a, b = world.couple_members(couple)
        pa, pb = world.people[a], world.people[b]
        assert pa.spouse == b and pb.spouse == a and pa.couple == pb.couple == couple
        assert pa.city != pb.city and pa.job != pb.job  # two-hop questions have one answer


def test_splits_are_disjoint_and_cover(tiny):
    world = load_world(tiny)
    splits = world.splits
    assert len(splits["test"]) == TINY["n_test_couples"] and len(splits["rl"]) == TINY["n_rl_couples"]
    sets = [set(v) for v in splits.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == TINY["n_couples"]


def people_named(world, text: str) -> set[int]:
    return {i for i, p in enumerate(world.people) if re.search(rf"\b{re.escape(p.name)}\b", text)}


@pytest.mark.parametrize("split,couples", [("train", "rl"), ("test", "test")])
def test_questions_use_only_their_couples(tiny, split, couples):
    world = load_world(tiny)
    allowed = {m for c in world.splits[couples] for m in world.couple_members(c)}
    df = pd.read_parquet(tiny / f"{split}.parquet")
    for q in df["question"]:
        named = people_named(world, q)
        assert named and named <= allowed, q


def test_row_schema_and_prompt(tiny):
    train, test = pd.read_parquet(tiny / "train.parquet"), pd.read_parquet(tiny / "test.parquet")
    assert len(train) == TINY["rl_questions"]
    assert test["data_source"].value_counts().to_dict() == {"nq": 8, "hotpotqa": 8}
    assert set(train["data_source"]) == {"nq", "hotpotqa"}
    for split, df in (("train", train), ("test", test)):
        assert {"data_source", "prompt", "ability", "reward_model", "extra_info", "question", "id"} <= set(df.columns)
        for index, row in enumerate(df.itertuples()):
            assert row.question == normalize_question(row.question)
            assert [dict(m) for m in row.prompt] == make_messages(row.question)
            assert row.ability == "fact-reasoning"
            assert row.reward_model["style"] == "rule"
            target = list(row.reward_model["ground_truth"]["target"])
            assert target == list(row.golden_answers) and len(target) == 1
            assert row.extra_info == {"split": split, "index": index}
            assert row.id == f"{split}_{index}"
        hop2 = df[df["data_source"] == "hotpotqa"]["question"]
        assert all(q.startswith("among ") for q in hop2)


def test_default_size_world_is_large_and_answers_are_allowed():
    world = make_world(0, world_sizes())
    assert len(corpus_rows(world)) >= 5000
    questions = split_questions(world)
    assert len(questions["test"]) == 400 and len(questions["train"]) == world_sizes().rl_questions
    for q in questions["train"] + questions["test"]:
        assert normalize_answer(q.answer) not in FORBIDDEN_ANSWERS, q
    for p in world.people:
        assert normalize_answer(p.city) not in FORBIDDEN_ANSWERS
        assert normalize_answer(p.name) not in FORBIDDEN_ANSWERS


def test_name_lists_are_disjoint():
    assert not set(first_names()) & set(surnames())
    assert len(first_names()) >= 200 and len(surnames()) >= 200


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="n_test_couples"):
        make_world(0, world_sizes(n_couples=10, n_test_couples=5, n_rl_couples=5))
    with pytest.raises(ValueError, match="two_hop_fraction"):
        make_world(0, world_sizes(two_hop_fraction=1.5))
