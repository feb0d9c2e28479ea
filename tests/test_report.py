"""The headline report renders from fixture files with the hand-checked numbers (tests/fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from searchr1 import provenance
from searchr1.report import ema, examples_markdown, load_curve, render_report, stable_hash, typical_failure
from searchr1.stats import read_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
SPLITS = ["nq_test", "hotpotqa_test"]
PUBLISHED = {"base": {"nq_test": 0.1620, "hotpotqa_test": 0.0984}, "rl": {"nq_test": 0.4576, "hotpotqa_test": 0.3381}}


REPORT_RECORD = provenance.make("report", {"scale": "full", "eval.splits": SPLITS})


def _render(
    tmp_path: Path,
    *,
    scale: str = "full",
    curve: bool = True,
    eval_dir: Path | None = None,
    final_path: Path | None = None,
) -> Path:
    results = tmp_path / "results"
    render_report(
        compare=("base", "rl"),
        eval_dir=eval_dir or FIXTURES / "eval",
        metrics_path=FIXTURES / "metrics.jsonl",
        published=PUBLISHED,
        splits=SPLITS,
        out_md=results / "headline.md",
        examples_md=results / "examples.md",
        plots_dir=results / "plots",
        scale=scale,
        record=REPORT_RECORD,
        final_path=final_path,
        provenance_json=results / "provenance.json",
        curve_path=FIXTURES / "curve.jsonl" if curve else None,
        n_examples=2,
    )
    return results


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixtures' report at full scale with the learning curve, rendered once for the tests that read it."""
    return _render(tmp_path_factory.mktemp("report"))


def _table_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no table row {first_cell!r} in:\n{md}")


def test_headline_numbers_full_scale(full: Path) -> None:
    md = (full / "headline.md").read_text()
    assert md.startswith("# Search-R1 on slime")
    assert REPORT_RECORD["settings_hash"] in md and REPORT_RECORD["code"]["source_sha"] in md and "**full**" in md
    # base NQ: 4/10 -> 0.400, Wilson 95% [0.168, 0.687]; HotpotQA: 1/5 -> 0.200 [0.036, 0.624]
    base = _table_row(md, "base")
    # then the average over the splits (the Search-R1 papers' "Avg."): (0.4 + 0.2) / 2 vs (0.162 + 0.0984) / 2
    assert base == [
        "base",
        "0.400 [0.168, 0.687]",
        "0.162",
        "+0.238",
        "0.200 [0.036, 0.624]",
        "0.098",
        "+0.102",
        "0.300",
        "0.130",
        "+0.170",
    ]
    # RL NQ 8/10 -> 0.800 [0.490, 0.943]; HotpotQA 3/5 -> 0.600 [0.231, 0.882]
    rl = _table_row(md, "RL")
    assert rl == [
        "RL",
        "0.800 [0.490, 0.943]",
        "0.458",
        "+0.342",
        "0.600 [0.231, 0.882]",
        "0.338",
        "+0.262",
        "0.700",
        "0.398",
        "+0.302",
    ]
    delta = _table_row(md, "delta (RL − base)")
    # ours +0.400 vs published +0.2956 -> +0.104; HotpotQA ours +0.400 vs +0.2397 -> +0.160
    assert delta == [
        "delta (RL − base)",
        "+0.400",
        "+0.296",
        "+0.104",
        "+0.400",
        "+0.240",
        "+0.160",
        "+0.400",
        "+0.268",
        "+0.132",
    ]


def test_behaviour_table(full: Path) -> None:
    md = (full / "headline.md").read_text()
    # columns: NQ base, NQ RL, HotpotQA base, HotpotQA RL
    assert _table_row(md, "searched at least once")[1:] == ["40.0%", "100.0%", "0.0%", "100.0%"]
    assert _table_row(md, "mean searches")[1:] == ["0.50", "1.10", "0.00", "1.20"]
    assert _table_row(md, "grounded (answer in retrieved text)")[1:] == ["30.0%", "80.0%", "0.0%", "60.0%"]
    assert _table_row(md, "format valid")[1:] == ["80.0%", "100.0%", "80.0%", "100.0%"]
    assert _table_row(md, "answered")[1:] == ["80.0%", "100.0%", "80.0%", "100.0%"]
    assert _table_row(md, "mean response tokens (model)")[1:] == ["23.0", "31.0", "12.0", "32.0"]
    assert _table_row(md, "truncated")[1:] == ["10.0%", "0.0%", "0.0%", "0.0%"]
    # base NQ: 3 of 6 wrong answers had no search; base HotpotQA 3 of 4; RL: a tie broken by category order
    assert _table_row(md, "typical failure")[1:] == [
        "no search (50.0% of wrong)",
        "answer not retrieved (50.0% of wrong)",
        "no search (75.0% of wrong)",
        "answer not retrieved (50.0% of wrong)",
    ]


def test_training_summary_and_links(full: Path) -> None:
    md = (full / "headline.md").read_text()
    assert "rollout steps: 20 (steps 0–19)" in md
    # first 0.000, last 0.950; the first/last 2 steps average 0.025 and 0.925; 20 x 2.5 s = 50 s
    assert "first step 0.000, last step 0.950" in md
    assert "mean of the first 2 steps 0.025, of the last 2 0.925" in md
    assert "training wall time (sum of per-step times): 50 s" in md
    for name in ("reward", "response_length", "searches", "em_curve"):
        assert f"(plots/{name}.png)" in md
    assert "(examples.md)" in md


def test_toy_scale_marks_published_as_not_comparable(tmp_path: Path) -> None:
    md = (_render(tmp_path, scale="toy") / "headline.md").read_text()
    assert "not comparable" in md
    assert _table_row(md, "base")[3] == "—" and _table_row(md, "RL")[6] == "—"
    assert _table_row(md, "base")[2] == "0.162"  # still shown for reference


@pytest.mark.parametrize("name", ["reward", "response_length", "searches", "em_curve"])
def test_plots_are_real_images(full: Path, name: str) -> None:
    path = full / "plots" / f"{name}.png"
    with Image.open(path) as img:
        assert img.size == (840, 480)  # 7 x 4 in at 120 dpi
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.var() > 0


def test_no_curve_no_em_plot(tmp_path: Path) -> None:
    results = _render(tmp_path, curve=False)
    assert not (results / "plots" / "em_curve.png").exists()
    assert "em_curve.png" not in (results / "headline.md").read_text()


def test_examples_are_deterministic_and_right(full: Path, tmp_path: Path) -> None:
    text = (full / "examples.md").read_text()
    again = (_render(tmp_path) / "examples.md").read_text()
    assert text == again
    # NQ: base wrong & RL right = nq_2, nq_3, nq_6, nq_7 (4); RL wrong = nq_4, nq_5 (2)
    assert "### Base wrong, RL right (2 of 4)" in text
    assert "### RL wrong (2 of 2)" in text
    nq = text.split("## HotpotQA")[0].split("### Base wrong, RL right")[1].split("### RL wrong")[0]
    expected = sorted(["nq_2", "nq_3", "nq_6", "nq_7"], key=stable_hash)[:2]
    assert [line.split("`")[1] for line in nq.splitlines() if line.startswith("#### ")] == expected
    assert "**base**" in text and "**RL**" in text and "<answer> Atlantis </answer>" in text


def test_fence_survives_backticks_in_responses() -> None:
    row = read_jsonl(FIXTURES / "eval" / "rl" / "nq_test.jsonl")[4]  # nq_4, RL wrong
    base = dict(read_jsonl(FIXTURES / "eval" / "base" / "nq_test.jsonl")[4], response="```\nrm -rf\n```")
    rows = {("base", "nq_test"): [base], ("rl", "nq_test"): [row]}
    text = examples_markdown(rows, ["nq_test"], 1, ("base", "rl"))
    assert "````text\n```\nrm -rf\n```\n````" in text


def test_missing_input_is_named(tmp_path: Path) -> None:
    eval_dir = tmp_path / "eval"
    shutil.copytree(FIXTURES / "eval", eval_dir)
    (eval_dir / "rl" / "hotpotqa_test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"rl/hotpotqa_test\.json"):
        _render(tmp_path, eval_dir=eval_dir)


def test_mismatched_question_sets_are_an_error(tmp_path: Path) -> None:
    eval_dir = tmp_path / "eval"
    shutil.copytree(FIXTURES / "eval", eval_dir)
    path = eval_dir / "rl" / "nq_test.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    meta = json.loads((eval_dir / "rl" / "nq_test.json").read_text())
    meta["n"] = 9
    (eval_dir / "rl" / "nq_test.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different questions of nq_test"):
        _render(tmp_path, eval_dir=eval_dir)


def test_ema_is_bias_corrected() -> None:
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_typical_failure_all_correct() -> None:
    assert typical_failure([{"em": 1.0}]) == "none (all correct)"


def test_curve_formats(tmp_path: Path) -> None:
    path = tmp_path / "curve.jsonl"
    lines = [
        {"step": 10, "split": "nq_test", "em": 0.5, "n": 10},
        {"step": 0, "dataset": "nq_test", "n": 10, "reward_mean": 0.25},  # slime's eval log hook
        {"step": 20, "eval/hotpotqa_test": 0.4},
        {"step": 20, "dataset": "other", "reward_mean": 0.9},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert load_curve(path, SPLITS) == {"nq_test": [(0, 0.25), (10, 0.5)], "hotpotqa_test": [(20, 0.4)]}


# --- provenance: every input's record is listed; mixed settings are refused, naming the key -------------


def _train_record(lr: float) -> dict:
    return provenance.make("train", {"seed": 42, "train.lr": lr, "agent.max_turns": 2})


def _eval_dir_with_records(tmp_path: Path, *, final_lr: float, model_lr: float) -> tuple[Path, Path]:
    """The fixture evals with provenance: RL evals scored a model trained at ``model_lr``; final.json says
    training ran at ``final_lr``."""
    eval_dir = tmp_path / "eval"
    shutil.copytree(FIXTURES / "eval", eval_dir)
    export = provenance.make("export_rl", {}, inputs={"final": _train_record(model_lr)})
    for model in ("base", "rl"):
        for split in SPLITS:
            path = eval_dir / model / f"{split}.json"
            meta = json.loads(path.read_text())
            inputs = {"model": export} if model == "rl" else {}
            meta["provenance"] = provenance.make(
                "evaluate", {"seed": 42, "agent.max_turns": 2, "eval.max_questions": None}, inputs=inputs
            )
            path.write_text(json.dumps(meta))
    final = tmp_path / "final.json"
    final.write_text(json.dumps({"backend": "torch", "provenance": _train_record(final_lr)}))
    return eval_dir, final


def test_report_lists_the_provenance_of_every_input(tmp_path: Path) -> None:
    eval_dir, final = _eval_dir_with_records(tmp_path, final_lr=1e-6, model_lr=1e-6)
    results = _render(tmp_path, eval_dir=eval_dir, final_path=final)
    md = (results / "headline.md").read_text()
    section = md.split("## Provenance", 1)[1]
    train_hash = _train_record(1e-6)["settings_hash"]
    assert f"| `{final}` | train | `{train_hash}` |" in section
    for model in ("base", "rl"):
        for split in SPLITS:
            assert f"`{eval_dir / model / (split + '.json')}` | evaluate |" in section
    recorded = json.loads((results / "provenance.json").read_text())
    assert recorded["provenance"]["settings_hash"] == REPORT_RECORD["settings_hash"]
    rl = recorded["inputs"][str(eval_dir / "rl" / "nq_test.json")]
    assert rl["inputs"]["model"]["inputs"]["final"]["settings"]["train.lr"] == 1e-6


def test_report_refuses_an_rl_eval_of_a_model_trained_under_other_settings(tmp_path: Path) -> None:
    eval_dir, final = _eval_dir_with_records(tmp_path, final_lr=1e-6, model_lr=5e-6)
    with pytest.raises(provenance.MixedSettingsError, match=r"'train\.lr'") as err:
        _render(tmp_path, eval_dir=eval_dir, final_path=final)
    assert str(final) in str(err.value) and "rl" in str(err.value)
    assert not (tmp_path / "results" / "headline.md").exists()


def test_report_refuses_evals_made_under_different_eval_settings(tmp_path: Path) -> None:
    eval_dir, final = _eval_dir_with_records(tmp_path, final_lr=1e-6, model_lr=1e-6)
    path = eval_dir / "base" / "hotpotqa_test.json"
    meta = json.loads(path.read_text())
    meta["provenance"] = provenance.make("evaluate", {"seed": 42, "agent.max_turns": 2, "eval.max_questions": 50})
    path.write_text(json.dumps(meta))
    with pytest.raises(provenance.MixedSettingsError, match=r"'eval\.max_questions'"):
        _render(tmp_path, eval_dir=eval_dir, final_path=final)


def test_the_report_needs_neither_the_evaluation_nor_the_agent_stack() -> None:
    import subprocess
    import sys

    code = "import sys, searchr1.report; print(sorted(m for m in sys.modules if m.startswith('searchr1')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "searchr1.stats" in loaded
    for module in ("searchr1.evaluate", "searchr1.agent", "searchr1.engines"):
        assert f"'{module}'" not in loaded


def test_headline_with_named_models_in_config_order_and_any_compared_pair(tmp_path: Path) -> None:
    """eval.models: a row per model after base and RL (config order), the average column for each, and the
    examples of any two named models (eval.compare)."""
    import shutil

    eval_dir = tmp_path / "eval"
    shutil.copytree(FIXTURES / "eval", eval_dir)
    shutil.copytree(eval_dir / "base", eval_dir / "zeta")  # named models keep config order, not sorted
    shutil.copytree(eval_dir / "rl", eval_dir / "alpha")
    results = tmp_path / "results"
    render_report(
        eval_dir=eval_dir,
        metrics_path=FIXTURES / "metrics.jsonl",
        published={**PUBLISHED, "alpha": {"nq_test": 0.5}},
        splits=SPLITS,
        out_md=results / "headline.md",
        examples_md=results / "examples.md",
        plots_dir=results / "plots",
        scale="full",
        record=REPORT_RECORD,
        n_examples=1,
        models=["base", "rl", "zeta", "alpha"],
        compare=("zeta", "alpha"),
    )
    md = (results / "headline.md").read_text()
    rows = [
        line.split("|")[1].strip()
        for line in md.split("## Exact match")[1].split("## Behaviour")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| model")
    ]
    assert rows == ["base", "RL", "zeta", "alpha", "delta (RL − base)"]
    base = _table_row(md, "base")
    assert _table_row(md, "zeta") == ["zeta", base[1], "—", "—", base[4], "—", "—", "0.300", "—", "—"]
    alpha = _table_row(md, "alpha")
    assert alpha[1:4] == ["0.800 [0.490, 0.943]", "0.500", "+0.300"] and alpha[7:] == ["0.700", "—", "—"]
    assert "HotpotQA zeta" in md and "HotpotQA alpha" in md  # behaviour columns for every model
    examples = (results / "examples.md").read_text()
    assert examples.startswith("# Zeta vs alpha") and "### Zeta wrong, alpha right (1 of 4)" in examples
    with pytest.raises(ValueError, match="compare must name two of the evaluated models"):
        render_report(
            eval_dir=eval_dir,
            metrics_path=FIXTURES / "metrics.jsonl",
            published=PUBLISHED,
            splits=SPLITS,
            out_md=results / "h2.md",
            examples_md=results / "x2.md",
            plots_dir=results / "plots",
            scale="full",
            record=REPORT_RECORD,
            models=["base", "rl"],
            compare=("base", "zeta"),
        )


def test_learning_curve_summary_in_headline(full: Path) -> None:
    md = (full / "headline.md").read_text()
    assert "- learning curve (greedy EM" in md
    assert "  - NQ: " in md and " → step " in md


def test_declared_curve_without_points_still_plots(tmp_path: Path) -> None:
    """eval.interval above num_rollout: the declared curve file is empty, em_curve.png (declared) still exists."""
    empty = tmp_path / "curve.jsonl"
    empty.write_text("")
    results = tmp_path / "results"
    render_report(
        compare=("base", "rl"),
        eval_dir=FIXTURES / "eval",
        metrics_path=FIXTURES / "metrics.jsonl",
        published=PUBLISHED,
        splits=SPLITS,
        out_md=results / "headline.md",
        examples_md=results / "examples.md",
        plots_dir=results / "plots",
        scale="full",
        record=REPORT_RECORD,
        curve_path=empty,
        n_examples=1,
    )
    assert (results / "plots" / "em_curve.png").stat().st_size > 0
    assert "- learning curve" not in (results / "headline.md").read_text()
