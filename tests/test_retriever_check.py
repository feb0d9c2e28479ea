"""The retriever check step (searchr1.steps.retrieval.retriever_check) on a real small index: a pair whose
passages are found by their own text passes; below MIN_SELF_RECALL it is refused naming both files."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from helpers import rule_params, serve_real_retriever

from searchr1.steps.retrieval import CHECK_PROBES, MIN_SELF_RECALL, retriever_check
from searchr1.steps.settings import StepSettings

CITIES = [
    "paris",
    "rome",
    "oslo",
    "lima",
    "cairo",
    "delhi",
    "tokyo",
    "quito",
    "accra",
    "hanoi",
    "kabul",
    "dakar",
    "sofia",
    "minsk",
    "riga",
    "doha",
]
PASSAGES = [
    {"id": f"p{i}", "contents": f'"Person {i}"\nperson {i} was born in {city} and works as a {job}'}
    for i, (city, job) in enumerate(zip(CITIES, ["baker", "pilot", "nurse", "judge"] * 4))
]
assert len(PASSAGES) <= CHECK_PROBES  # every passage is probed


def run_check(
    tmp_path: Path,
    monkeypatch,
    served: list[dict],
    *,
    configfiles: tuple[str, ...] = ("config.yaml", "config.toy.yaml"),
    seen: dict | None = None,
) -> dict:
    """retriever_check on its declared toy settings, the corpus file holding PASSAGES and the retriever
    serving ``served`` (a real MiniLM encoder and faiss index; the server process is the only stand-in)."""
    import searchr1.retrieval.index
    import searchr1.retrieval.managed

    corpus, index = tmp_path / "corpus.jsonl", tmp_path / "index.faiss"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in PASSAGES), encoding="utf-8")
    index.write_bytes(b"")

    @contextlib.contextmanager
    def managed_server(**kwargs):
        assert (kwargs["corpus"], kwargs["index"]) == (str(corpus), str(index))
        if seen is not None:
            seen.update(kwargs)
        with serve_real_retriever(served, tmp_path / "served") as url:
            yield url

    (tmp_path / "served").mkdir()
    monkeypatch.setattr(searchr1.retrieval.managed, "managed_server", managed_server)
    monkeypatch.setattr(searchr1.retrieval.index, "check_pair", lambda i, c: {"n": len(PASSAGES)})
    out = tmp_path / "check.json"
    cfg = StepSettings.from_params(rule_params("retriever_check", *configfiles), step="retriever_check")
    retriever_check(
        cfg,
        inputs={"corpus": str(corpus), "index": str(index), "encoder": str(tmp_path / "enc")},
        outputs={"_list": [str(out)]},
        log_path=tmp_path / "logs" / "check.log",
    )
    return json.loads(out.read_text())


def relabelled(n_right: int) -> list[dict]:
    """PASSAGES whose first ``n_right`` keep their ids; the rest carry ids of another corpus."""
    return [p if i < n_right else {**p, "id": f"other{i}"} for i, p in enumerate(PASSAGES)]


def test_a_matching_pair_finds_every_passage_by_its_text(tmp_path, monkeypatch):
    report = run_check(tmp_path, monkeypatch, PASSAGES)
    assert report["self_recall_at_k"] == 1.0
    assert (report["probes"], report["topk"]) == (len(PASSAGES), 3)


def test_recall_at_the_threshold_passes(tmp_path, monkeypatch):
    n_right = int(MIN_SELF_RECALL * len(PASSAGES))
    assert n_right / len(PASSAGES) == MIN_SELF_RECALL
    assert run_check(tmp_path, monkeypatch, relabelled(n_right))["self_recall_at_k"] == MIN_SELF_RECALL


@pytest.mark.parametrize("n_right", [int(MIN_SELF_RECALL * len(PASSAGES)) - 1, 0])
def test_a_mismatched_pair_is_refused_naming_both_files(tmp_path, monkeypatch, n_right):
    with pytest.raises(RuntimeError, match=r"self-recall@3 is (\d\.\d\d) on 16 passages") as err:
        run_check(tmp_path, monkeypatch, relabelled(n_right))
    message = str(err.value)
    assert f"{n_right / len(PASSAGES):.2f}" in message
    assert str(tmp_path / "corpus.jsonl") in message and str(tmp_path / "index.faiss") in message
    assert not (tmp_path / "check.json").exists()  # no report: the job fails and Snakemake keeps no output


def test_the_checks_retriever_is_placed_as_configured(tmp_path, monkeypatch):
    """retriever.placement reaches the server the check starts: the toy's cpu hides every GPU from it (it used to
    inherit the job's GPUs), the recipe's dedicated GPU is the one SLURM gave the job."""
    seen: dict = {}
    run_check(tmp_path, monkeypatch, PASSAGES, seen=seen)
    assert seen["env"] == {"CUDA_VISIBLE_DEVICES": ""}
    args = seen["extra_args"]
    assert args[args.index("--device") + 1] == "cpu" and args[args.index("--index-device") + 1] == "cpu"
    seen.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    (tmp_path / "recipe").mkdir()
    run_check(tmp_path / "recipe", monkeypatch, PASSAGES, configfiles=("config.yaml",), seen=seen)
    assert seen["env"] == {"CUDA_VISIBLE_DEVICES": "5"}
    assert seen["extra_args"][seen["extra_args"].index("--device") + 1] == "cuda:0"
