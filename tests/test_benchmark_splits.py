"""Issue 15: eval.splits selects any of the seven Search-R1 benchmarks; a split the downloaded test file lacks
is built from a FlashRAG-shaped dataset on the local hub server the way Search-R1's qa_search_test_merge.py
builds it (test, else dev, else train; same prompt and row schema), and a split found nowhere is an error."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from helpers import config, run_job_in_fresh_process
from hubserver import HubServer

from searchr1.data import ROW_COLUMNS, make_row
from searchr1.prompt import make_messages

FLASHRAG = "RUC-NLPIR/FlashRAG_datasets"


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    return buf.getvalue()


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _search_r1_rows(n: int, source: str, split: str) -> list[dict]:
    rows = []
    for i in range(n):
        row = make_row(f"{source} question {i}", [f"answer {i}"], data_source=source, split=split, index=i, qid="x")
        rows.append({c: row[c] for c in ROW_COLUMNS})
    return rows


def _flashrag(source: str, n: int, split: str) -> list[dict]:
    # FlashRAG's fields; questions without '?' and with stray spaces, as the raw datasets have them
    return [
        {
            "id": f"{split}_{i}",
            "question": f"  {source} {split} question {i} ",
            "golden_answers": [f"a{i}", f"b{i}"],
            "metadata": {},
        }
        for i in range(n)
    ]


def _prepare(
    hub: HubServer, tmp_path: Path, splits: dict[str, dict], selected: list[str]
) -> subprocess.CompletedProcess:
    """Rule prepare_data's job under exactly the params Snakemake gives it, in a fresh process (HF_ENDPOINT)."""
    qa = tmp_path / "qa"
    qa.mkdir(exist_ok=True)
    (qa / "train.parquet").write_bytes(_parquet(_search_r1_rows(3, "nq", "train")))
    (qa / "test.parquet").write_bytes(
        _parquet(_search_r1_rows(4, "nq", "test") + _search_r1_rows(6, "hotpotqa", "test"))
    )
    extra = {"data_dir": str(tmp_path / "data"), "data": {"splits": splits}, "eval": {"splits": selected}}
    (tmp_path / "extra.yaml").write_text(json.dumps(extra))
    return run_job_in_fresh_process(
        "prepare_data",
        "data.prepare_data",
        ("config.yaml", str(tmp_path / "extra.yaml")),
        hub.client_env(),
        inputs={"train": str(qa / "train.parquet"), "test": str(qa / "test.parquet")},
        outputs={"train": str(tmp_path / "out/train.parquet")},
    )


@pytest.fixture()
def flashrag_hub():
    with HubServer() as hub:
        hub.state.add(
            "dataset",
            FLASHRAG,
            {
                "triviaqa/train.jsonl": _jsonl(_flashrag("triviaqa", 9, "train")),
                "triviaqa/dev.jsonl": _jsonl(_flashrag("triviaqa", 7, "dev")),
                "triviaqa/test.jsonl": _jsonl(_flashrag("triviaqa", 5, "test")),
                "musique/train.jsonl": _jsonl(_flashrag("musique", 8, "train")),
                "musique/dev.jsonl": _jsonl(_flashrag("musique", 3, "dev")),
                "popqa/train.jsonl": _jsonl(_flashrag("popqa", 2, "train")),
            },
        )
        yield hub


def test_config_lists_the_seven_benchmarks_and_keeps_the_seed_default():
    cfg = config()
    sources = [spec["data_source"] for spec in cfg["data"]["splits"].values()]
    assert sources == ["nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle"]
    assert cfg["eval"]["splits"] == ["nq_test", "hotpotqa_test"]
    assert cfg["data"]["flashrag"]["repo"] == FLASHRAG


def test_missing_splits_are_built_from_flashrag_like_search_r1(flashrag_hub, tmp_path):
    splits = {
        "nq_test": {"data_source": "nq", "expected_rows": 4},
        "triviaqa_test": {"data_source": "triviaqa", "expected_rows": 5},  # test exists: test
        "musique_test": {"data_source": "musique", "expected_rows": 3},  # no test: dev
        "popqa_test": {"data_source": "popqa", "expected_rows": None},  # only train: train
    }
    res = _prepare(flashrag_hub, tmp_path, splits, list(splits))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    downloaded = pd.read_parquet(out / "nq_test.parquet")
    for name, source, raw_split, n in (
        ("triviaqa_test", "triviaqa", "test", 5),
        ("musique_test", "musique", "dev", 3),
        ("popqa_test", "popqa", "train", 2),
    ):
        built = pd.read_parquet(out / f"{name}.parquet")
        # the downloaded splits' row schema: same columns, same types, same nesting
        assert list(built.columns) == list(downloaded.columns) and len(built) == n
        assert dict(built.dtypes) == dict(downloaded.dtypes)
        rows = built.to_dict("records")
        for i, row in enumerate(rows):
            question = f"{source} {raw_split} question {i}?"  # stripped, '?' added (make_prefix's rule)
            assert row["question"] == question and row["data_source"] == source and row["ability"] == "fact-reasoning"
            assert [dict(m) for m in row["prompt"]] == make_messages(question)
            assert list(row["reward_model"]["ground_truth"]["target"]) == [f"a{i}", f"b{i}"]
            assert row["reward_model"]["style"] == "rule"
            assert row["extra_info"] == {"split": "test", "index": i} and row["id"] == f"{source}-test-{i}"
    # the prompt is the downloaded splits' prompt for the same question
    same = make_row("nq question 0", ["x"], data_source="nq", split="test", index=0, qid="")["prompt"]
    assert [dict(m) for m in downloaded.iloc[0]["prompt"]] == same
    # verified and locked like every download; recorded in the splits' provenance
    lock = json.loads((tmp_path / "data/download-lock.json").read_text())
    assert {
        f"dataset:{FLASHRAG}/{s}" for s in ("triviaqa/test.jsonl", "musique/dev.jsonl", "popqa/train.jsonl")
    } <= set(lock)
    from searchr1.provenance import of_parquet

    record = of_parquet(out / "musique_test.parquet")
    assert record["inputs"]["flashrag"]["musique"] == {"repo": FLASHRAG, "revision": "main", "split": "dev"}


def test_a_split_found_nowhere_is_an_error_listing_the_test_file(flashrag_hub, tmp_path):
    splits = {"bamboogle_test": {"data_source": "bamboogle", "expected_rows": 125}}
    res = _prepare(flashrag_hub, tmp_path, splits, ["bamboogle_test"])
    assert res.returncode != 0
    assert "split 'bamboogle_test': no rows with data_source='bamboogle'" in res.stderr
    assert "{'hotpotqa': 6, 'nq': 4}" in res.stderr or "{'nq': 4, 'hotpotqa': 6}" in res.stderr


def test_a_wrong_row_count_of_a_built_split_is_an_error(flashrag_hub, tmp_path):
    splits = {"musique_test": {"data_source": "musique", "expected_rows": 2417}}
    res = _prepare(flashrag_hub, tmp_path, splits, ["musique_test"])
    assert res.returncode != 0 and "split 'musique_test': 3 rows" in res.stderr
