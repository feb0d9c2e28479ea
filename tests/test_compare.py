"""The experiments' comparison (searchr1.compare) against hand-computed cases where the variance is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from searchr1.compare import AVERAGE, bootstrap_draws, difference, mean_sd


def test_mean_sd_is_the_sample_sd() -> None:
    assert mean_sd([0.5]) == (0.5, None)
    mean, sd = mean_sd([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert sd == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)


def test_identical_runs_differ_by_exactly_zero() -> None:
    runs = [[1, 0, 1, 1, 0, 0, 1, 0]] * 2
    got = difference({"nq": runs}, {"nq": runs}, seed=0)
    assert (got["nq"].estimate, got["nq"].low, got["nq"].high) == (0.0, 0.0, 0.0)


def test_seed_level_alone_two_seeds() -> None:
    """Every question scored alike within a run: only the seeds vary. The reference is 0 on both seeds; the
    other experiment's seeds score 1 and 0, so a draw's mean over two redrawn seeds is 0, 0.5 or 1 with
    probabilities 1/4, 1/2, 1/4: the estimate is 0.5 and the 95% interval [0, 1]."""
    q = 50
    ref = [[0] * q, [0] * q]
    other = [[1] * q, [0] * q]
    draws = bootstrap_draws({"nq": ref}, {"nq": other}, seed=1, samples=4000)["nq"]
    values, counts = np.unique(np.round(draws, 9), return_counts=True)
    assert list(values) == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    got = difference({"nq": ref}, {"nq": other}, seed=1)["nq"]
    assert (got.estimate, got.low, got.high) == pytest.approx((0.5, 0.0, 1.0))


def test_question_level_alone_one_seed_is_the_paired_bootstrap() -> None:
    """One seed each: the paired bootstrap over questions. 100 of 400 questions right only for the other
    model, the rest alike: paired differences d with mean 0.25 and variance 0.25 * 0.75, so the interval is
    0.25 ± 1.96 * sqrt(0.1875 / 400) = 0.25 ± 0.0424 (normal approximation; the bootstrap within 0.006)."""
    ref = [[0] * 100 + [1] * 150 + [0] * 150]
    other = [[1] * 100 + [1] * 150 + [0] * 150]
    got = difference({"nq": ref}, {"nq": other}, seed=3)["nq"]
    half = 1.959964 * math.sqrt(0.25 * 0.75 / 400)
    assert got.estimate == pytest.approx(0.25)
    assert got.low == pytest.approx(0.25 - half, abs=0.006)
    assert got.high == pytest.approx(0.25 + half, abs=0.006)


def test_unpaired_would_be_wider_so_the_pairing_is_used() -> None:
    """Both models right on the same 150 questions: the paired interval (above) is far narrower than the
    unpaired one (sd of a difference of two independent proportions 0.625 and 0.375 over 400: 0.0342)."""
    ref = [[0] * 100 + [1] * 150 + [0] * 150]
    other = [[1] * 100 + [1] * 150 + [0] * 150]
    got = difference({"nq": ref}, {"nq": other}, seed=3)["nq"]
    unpaired_half = 1.959964 * math.sqrt(0.625 * 0.375 / 400 + 0.375 * 0.625 / 400)
    assert got.high - got.low < 0.7 * 2 * unpaired_half


def test_both_levels_add_up() -> None:
    """Seeds and questions together: three seeds per experiment at EM 0.2, 0.3, 0.4 (reference) and 0.4,
    0.5, 0.6 (other), 1000 questions. The seed-level variance of the difference of two 3-seed means is
    2 * (0.01 * 2 / 3) / 3 (the bootstrap's plug-in variance of a mean of 3 redrawn values: population
    variance / 3), the question level adds little; the interval's half-width is near 1.96 * sqrt(that)."""
    q = 1000
    rng = np.random.default_rng(0)
    order = rng.permutation(q)

    def run(em: float) -> list[int]:
        row = np.zeros(q, int)
        row[order[: int(em * q)]] = 1  # nested sets of right questions: runs share their easy questions
        return row.tolist()

    ref = [run(0.2), run(0.3), run(0.4)]
    other = [run(0.4), run(0.5), run(0.6)]
    got = difference({"nq": ref}, {"nq": other}, seed=5)["nq"]
    assert got.estimate == pytest.approx(0.2)
    seed_sd = math.sqrt(2 * (0.02 / 3) / 3)  # 0.0667
    half = (got.high - got.low) / 2
    assert 1.7 * seed_sd < half < 2.3 * seed_sd


def test_average_over_splits_and_determinism() -> None:
    ref = {"a": [[0, 1, 0, 1]], "b": [[0, 0, 0, 0]]}
    other = {"a": [[1, 1, 0, 1]], "b": [[1, 1, 1, 1]]}
    one = difference(ref, other, seed=7)
    assert one["a"].estimate == pytest.approx(0.25)
    assert one["b"].estimate == pytest.approx(1.0)
    assert one[AVERAGE].estimate == pytest.approx(0.625)
    assert one["b"].low == one["b"].high == 1.0
    assert difference(ref, other, seed=7) == one  # seeded: the same interval every time


def test_mismatched_questions_are_refused() -> None:
    with pytest.raises(ValueError, match="different numbers of questions"):
        difference({"a": [[0, 1]]}, {"a": [[0, 1, 1]]}, seed=0)
