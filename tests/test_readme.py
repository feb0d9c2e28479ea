"""The README's figures agree with the config where they name the same thing, and it stays a short page.

The toy results table is checked against a real toy run in tests/test_toy_e2e.py."""

from __future__ import annotations

import re

from helpers import ROOT, config

README = (ROOT / "README.md").read_text()


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_readme_is_short_and_links_pages_that_exist():
    assert len(README.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links {target}, which does not exist"


def test_the_seed_table_is_the_configs():
    full = config()
    rows = {
        "nq_test": re.search(r"NQ \(([\d,]+)\)", README).group(1),
        "hotpotqa_test": re.search(r"HotpotQA \(([\d,]+)\)", README).group(1),
    }
    for split, count in rows.items():
        assert _number(count) == full["data"]["splits"][split]["expected_rows"], split
    base = re.search(r"\| Qwen2\.5-3B base \| ([\d.]+) \| ([\d.]+) \|", README).groups()
    rl = re.search(r"\| after GRPO with search \| ([\d.]+) \| ([\d.]+) \|", README).groups()
    for name, values in (("base", base), ("rl", rl)):
        published = full["published"][name]
        assert [float(v) for v in values] == [published["nq_test"], published["hotpotqa_test"]], name
    rollouts = re.search(r"slime GRPO, (\d+) rollouts", README).group(1)
    assert int(rollouts) == full["train"]["num_rollout"]


def test_the_toy_sentence_is_the_toy_configs():
    """'A 1.5M-parameter model, 15 rollouts of 8 prompts x 8 samples, ... on 200 questions per split' (the model's
    real parameter count is checked on the toy run in tests/test_toy_e2e.py)."""
    toy = config(toy=True)
    params_m, rollouts, prompts, samples, questions = toy_sentence()
    assert int(rollouts) == toy["train"]["num_rollout"]
    assert int(prompts) == toy["train"]["rollout_batch_size"]
    assert int(samples) == toy["train"]["n_samples_per_prompt"]
    assert int(questions) == toy["toy"]["test_per_split"]
    assert all(toy["data"]["splits"][split]["expected_rows"] == int(questions) for split in toy["eval"]["splits"])
    assert round(toy["budget"]["policy_params"] / 1e6, 1) == float(params_m)


def toy_sentence() -> tuple[str, ...]:
    m = re.search(
        r"A ([\d.]+)M-parameter model, (\d+) rollouts of (\d+) prompts × (\d+) samples, greedy evaluation on "
        r"(\d+) questions per split",
        README,
    )
    assert m, "the toy sentence is missing from the README"
    return m.groups()


def toy_table() -> dict[str, dict[str, float]]:
    """The README's toy results: split -> base/RL EM and searched-at-least-once rates (fractions)."""
    rows = re.findall(r"^\| `(\w+)` \([^)]*\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% → ([\d.]+)% \|$", README, flags=re.M)
    assert rows, "the toy results table is missing from the README"
    return {
        split: {
            "base_em": float(b),
            "rl_em": float(r),
            "base_searched": float(sb) / 100,
            "rl_searched": float(sr) / 100,
        }
        for split, b, r, sb, sr in rows
    }


def test_the_toy_table_names_every_toy_split():
    assert set(toy_table()) == set(config(toy=True)["eval"]["splits"])
