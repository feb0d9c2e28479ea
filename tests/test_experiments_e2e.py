"""Experiments x seeds end to end on the toy world, reduced for CI: two experiments x two seeds at a few rollouts,
in a copy of the session's finished toy run (its data, index and warm-started policy are reused: only the four
runs' training and evaluation, the base models' evaluation at fewer questions and the report run).

The full demo (recipe vs the format reward x 3 seeds at the toy's 15 rollouts) is docs/experiments.md's command.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import snakemake_cmd

pytestmark = pytest.mark.slow

SPLITS = ("nq_test", "hotpotqa_test")
REDUCED = {
    # the demo's pair: the recipe (pure EM) and Search-R1's published format reward
    "experiments": {"recipe": {}, "format": {"reward": {"structure_format_score": 0.2, "final_format_score": 0.1}}},
    "train": {"seeds": [1, 2], "num_rollout": 2},
    "eval": {"interval": 2, "curve_subset": 10, "max_questions": 30},
}
RUNS = [(e, s) for e in ("recipe", "format") for s in (1, 2)]


@pytest.fixture(scope="module")
def reduced(toy_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wf = tmp_path_factory.mktemp("experiments_e2e") / "wf"
    shutil.copytree(toy_run, wf, symlinks=True)  # mtimes and Snakemake's records kept: nothing upstream reruns
    (wf / "reduced.yaml").write_text(yaml.safe_dump(REDUCED))
    start = time.monotonic()
    res = subprocess.run(
        snakemake_cmd("results/headline.md", extra=("--configfile", "config.yaml", "config.toy.yaml", "reduced.yaml")),
        cwd=wf,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    (wf / "experiments.out").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-6000:]
    (wf / "experiments_elapsed_s").write_text(f"{time.monotonic() - start:.1f}\n")
    return wf


def test_only_the_runs_and_evaluations_ran(reduced: Path, toy_run: Path) -> None:
    """The data, index and warm-started policy were reused (copied with their times; not made again)."""
    for path in ("results/data/train.parquet", "data/toy/index/index.faiss", "data/toy/models/policy_base"):
        assert (reduced / path).stat().st_mtime == (toy_run / path).stat().st_mtime, path


def test_every_run_trained_with_its_own_seed_and_settings(reduced: Path) -> None:
    for experiment, seed in RUNS:
        train = reduced / f"results/runs/{experiment}/seed{seed}/train"
        rows = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert [r["step"] for r in rows] == [0, 1]
        settings = json.loads((train / "final.json").read_text())["provenance"]["settings"]
        assert settings["train.seed"] == seed
        assert settings["reward.structure_format_score"] == (0.2 if experiment == "format" else 0)
        assert settings["reward.final_format_score"] == (0.1 if experiment == "format" else 0)
        # the training reward and the EM of the same rollouts, side by side
        assert all("reward_mean" in r and "em_mean" in r for r in rows)
        if experiment == "recipe":
            assert all(r["reward_mean"] == r["em_mean"] for r in rows)
        for split in SPLITS:
            assert (reduced / f"results/eval/rl-{experiment}-s{seed}/{split}.jsonl").is_file()
    # two seeds of one experiment sample different rollouts
    a, b = ((reduced / f"results/runs/recipe/seed{s}/train/metrics.jsonl").read_text() for s in (1, 2))
    assert a != b


def test_the_headline_compares_the_experiments(reduced: Path) -> None:
    md = (reduced / "results/headline.md").read_text()
    assert "| `recipe` (2 seeds) |" in md and "| `format` (2 seeds) |" in md
    assert "| `format` − `recipe` |" in md and "two-level bootstrap" in md
    for row in ("format valid (Search-R1's is_valid_sequence)", "closes `</think>`", "searched at least once"):
        assert f"| {row} |" in md
    for plot in ("reward.png", "em_curve.png", "response_length.png"):
        assert (reduced / "results/plots" / plot).stat().st_size > 5_000
    provenance = json.loads((reduced / "results/provenance.json").read_text())["inputs"]
    assert sum(1 for label in provenance if label.endswith("final.json")) == 4


def test_the_single_runs_results_are_still_there(reduced: Path) -> None:
    """The default run's files are not the experiments' (their own paths); the headline is the experiments'."""
    assert (reduced / "results/train/metrics.jsonl").is_file()
    assert (reduced / "results/eval/rl/nq_test.json").is_file()
