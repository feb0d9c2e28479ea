"""The headline of several runs (experiments x seeds): per-seed EM, mean ± sd, the difference to the first
experiment with its interval, behaviour rows, per-run provenance; built from the report fixtures with
hand-checked changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from searchr1 import provenance
from searchr1.experiments import Run
from searchr1.report import RunInputs, render_experiments_report

FIXTURES = Path(__file__).parent / "fixtures"
SPLITS = ["nq_test", "hotpotqa_test"]
EXPERIMENTS = {"recipe": {}, "fmt": {"agent": {"max_turns": 3}}}
RUNS = [Run("recipe", 1, False), Run("recipe", 2, False), Run("fmt", 1, False), Run("fmt", 2, False)]
EVAL_SETTINGS = {"eval.temperature": 0.0, "agent.max_turns": 2}


def _flip(eval_dir: Path, model: str, split: str, to: float, count: int = 1) -> None:
    """Set the EM of the first ``count`` questions scored otherwise to ``to`` (the JSON summary's n stays)."""
    path = eval_dir / model / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if count and row["em"] != to:
            row["em"], count = to, count - 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _record(eval_dir: Path, model: str, settings: dict) -> None:
    for split in SPLITS:
        path = eval_dir / model / f"{split}.json"
        data = json.loads(path.read_text())
        data["provenance"] = provenance.make("evaluate", settings)
        path.write_text(json.dumps(data))


def _world(tmp_path: Path) -> tuple[Path, list[RunInputs]]:
    eval_dir = tmp_path / "results" / "eval"
    shutil.copytree(FIXTURES / "eval" / "base", eval_dir / "base")
    for run in RUNS:
        shutil.copytree(FIXTURES / "eval" / "rl", eval_dir / run.model)
    # fixture RL: NQ 8/10. recipe: seed 1 0.8, seed 2 0.7; fmt: seed 1 0.9, seed 2 0.8.
    _flip(eval_dir, "rl-recipe-s2", "nq_test", 0.0)
    _flip(eval_dir, "rl-fmt-s1", "nq_test", 1.0)
    _record(eval_dir, "base", EVAL_SETTINGS)
    for run in RUNS:
        changed = {"agent.max_turns": 3} if run.experiment == "fmt" else {}
        _record(eval_dir, run.model, {**EVAL_SETTINGS, **changed})
    inputs = []
    for run in RUNS:
        train = tmp_path / run.results_dir / "train"
        train.mkdir(parents=True)
        shutil.copy(FIXTURES / "metrics.jsonl", train / "metrics.jsonl")
        (train / "final.json").write_text(
            json.dumps({"provenance": provenance.make("train", {"train.seed": run.seed, "train.lr": 1e-6})})
        )
        shutil.copy(FIXTURES / "curve.jsonl", train / "eval_curve.jsonl")
        inputs.append(RunInputs(run, train / "metrics.jsonl", train / "final.json", train / "eval_curve.jsonl"))
    return eval_dir, inputs


def _render(tmp_path: Path, eval_dir: Path, inputs: list[RunInputs]) -> str:
    out = tmp_path / "results"
    render_experiments_report(
        eval_dir=eval_dir,
        runs=inputs,
        experiments=EXPERIMENTS,
        published={},
        splits=SPLITS,
        out_md=out / "headline.md",
        examples_md=out / "examples.md",
        plots_dir=out / "plots",
        scale="toy",
        record=provenance.make("report", {"scale": "toy"}),
        provenance_json=out / "provenance.json",
        other_models=[],
        compare=["base", "rl"],
        bootstrap_seed=0,
    )
    return (out / "headline.md").read_text()


def _row(md: str, first: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| {first} |"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row {first!r} in:\n{md}")


def test_per_seed_em_mean_sd_and_difference(tmp_path: Path) -> None:
    eval_dir, inputs = _world(tmp_path)
    md = _render(tmp_path, eval_dir, inputs)
    # NQ: recipe 0.8, 0.7 -> 0.750 ± 0.071; fmt 0.9, 0.8 -> 0.850 ± 0.071; HotpotQA unchanged (fixture 3/5)
    recipe = _row(md, "`recipe` (2 seeds)")
    assert recipe[1] == "0.750 ± 0.071 (0.800, 0.700)"
    assert recipe[2] == "0.600 ± 0.000 (0.600, 0.600)"
    assert _row(md, "`fmt` (2 seeds)")[1] == "0.850 ± 0.071 (0.900, 0.800)"
    diff = _row(md, "`fmt` − `recipe`")
    assert diff[1].startswith("+0.100 [")
    assert diff[2] == "+0.000 [+0.000, +0.000]"  # identical answers on every seed: no spread at all
    assert diff[3].startswith("+0.050 [")  # the average over the two splits
    low, high = (float(x) for x in diff[1].split("[")[1].rstrip("]").split(","))
    assert low <= 0.0 < 0.1 <= high  # 2 seeds x 10 questions: no claim of a difference
    assert "two-level bootstrap" in md and "4000 draws" in md
    # behaviour rows (the fixture RL is format valid and closes </think> on every question)
    assert _row(md, "format valid (Search-R1's is_valid_sequence)")[1:] != []
    assert _row(md, "closes `</think>`")
    assert _row(md, "searched at least once")
    assert _row(md, "answered")
    for plot in ("reward.png", "response_length.png", "em_curve.png"):
        assert (tmp_path / "results" / "plots" / plot).stat().st_size > 1000


def test_a_run_made_under_mixed_settings_is_refused(tmp_path: Path) -> None:
    eval_dir, inputs = _world(tmp_path)
    _record(eval_dir, "rl-fmt-s2", {**EVAL_SETTINGS, "agent.max_turns": 3, "eval.temperature": 0.5})
    with pytest.raises(provenance.MixedSettingsError, match="eval.temperature"):
        _render(tmp_path, eval_dir, inputs)


def test_an_experiments_own_setting_is_not_mixing_but_another_experiments_is(tmp_path: Path) -> None:
    eval_dir, inputs = _world(tmp_path)
    _render(tmp_path, eval_dir, inputs)  # fmt's agent.max_turns 3 against base's 2: by design
    _record(eval_dir, "rl-recipe-s1", {**EVAL_SETTINGS, "agent.max_turns": 3})  # recipe does not change it
    with pytest.raises(provenance.MixedSettingsError, match="agent.max_turns"):
        _render(tmp_path, eval_dir, inputs)
