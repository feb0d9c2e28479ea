"""Comparing experiments trained over several seeds: mean ± sd over seeds, and the difference between two
experiments with a 95% interval from a two-level (hierarchical) bootstrap over seeds and questions.

Two sources of variation make one experiment's EM differ from another's: which questions were asked (the
test split is a sample) and which training seeds were drawn (a run is a sample of the training's randomness).
The bootstrap redraws both, as they were sampled: each experiment's seeds with replacement (independently:
seed 1 of one experiment has nothing in common with seed 1 of another), and the questions with replacement,
once per draw for all runs (every model answered the same questions, so the comparison is paired over
questions). A draw's statistic is the difference of the two experiments' mean EM over their redrawn seeds,
each seed's EM taken over the redrawn questions; the interval is the 2.5th and 97.5th percentiles of
:data:`BOOTSTRAP_SAMPLES` draws. The seeds are redrawn once per draw for all splits (a run is the same
model on every split), the questions per split. With one seed per experiment it is the paired bootstrap over
questions; with few seeds the seed level is coarse (two seeds give three possible means), so the interval
is wide, as it should be.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 4000  # percentile interval endpoints move by < 0.002 EM between reruns at this size
_CHUNK = 250  # draws per block (bounds memory: a block's question weights are _CHUNK x questions)
AVERAGE = "average"  # the key of the unweighted mean over splits in the results

METHOD = (
    "95% percentile interval of a two-level bootstrap ({samples} draws, seeded): each draw resamples every "
    "experiment's seeds with replacement and the questions of each split with replacement (the same questions "
    "for both experiments: paired), and takes the difference of the mean EM over the resampled seeds; so it "
    "accounts for both the questions and the training seeds."
)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); sd is None for a single value."""
    if not values:
        raise ValueError("mean_sd needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _matrix(runs: Sequence[Sequence[float]], split: str, which: str) -> np.ndarray:
    m = np.asarray(runs, dtype=float)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"{which} on {split}: need at least one seed with at least one question, got {m.shape}")
    return m


def bootstrap_draws(
    reference: Mapping[str, Sequence[Sequence[float]]],
    other: Mapping[str, Sequence[Sequence[float]]],
    *,
    seed: int,
    samples: int = BOOTSTRAP_SAMPLES,
) -> dict[str, np.ndarray]:
    """The bootstrap distribution of mean EM(other) − mean EM(reference), per split and their average.

    ``reference[split]`` and ``other[split]`` are (seeds x questions) per-question EM, the questions in the
    same order for both (same split, same question ids).
    """
    splits = list(reference)
    if list(other) != splits or not splits:
        raise ValueError(f"both experiments need the same splits, got {list(reference)} and {list(other)}")
    ref = {s: _matrix(reference[s], s, "reference") for s in splits}
    oth = {s: _matrix(other[s], s, "other") for s in splits}
    for s in splits:
        if ref[s].shape[1] != oth[s].shape[1]:
            raise ValueError(f"{s}: the experiments were evaluated on different numbers of questions")
    n_ref, n_oth = ref[splits[0]].shape[0], oth[splits[0]].shape[0]
    if any(ref[s].shape[0] != n_ref or oth[s].shape[0] != n_oth for s in splits):
        raise ValueError("every split needs the same seeds of an experiment")
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {s: [] for s in splits}
    done = 0
    while done < samples:
        c = min(_CHUNK, samples - done)
        seeds_ref = rng.integers(0, n_ref, size=(c, n_ref))
        seeds_oth = rng.integers(0, n_oth, size=(c, n_oth))
        for s in splits:
            q = ref[s].shape[1]
            weights = rng.multinomial(q, np.full(q, 1.0 / q), size=c) / q  # c x questions
            run_ref = weights @ ref[s].T  # c x seeds: each seed's EM on the redrawn questions
            run_oth = weights @ oth[s].T
            diff = np.take_along_axis(run_oth, seeds_oth, axis=1).mean(axis=1) - np.take_along_axis(
                run_ref, seeds_ref, axis=1
            ).mean(axis=1)
            out[s].append(diff)
        done += c
    draws = {s: np.concatenate(v) for s, v in out.items()}
    draws[AVERAGE] = np.mean([draws[s] for s in splits], axis=0)
    return draws


def difference(
    reference: Mapping[str, Sequence[Sequence[float]]],
    other: Mapping[str, Sequence[Sequence[float]]],
    *,
    seed: int,
    samples: int = BOOTSTRAP_SAMPLES,
) -> dict[str, Interval]:
    """mean EM(other) − mean EM(reference) per split and averaged over splits, each with its 95% interval
    (:data:`METHOD`)."""
    draws = bootstrap_draws(reference, other, seed=seed, samples=samples)
    out = {}
    for s in reference:
        est = float(
            np.mean(np.asarray(other[s], float).mean(axis=1)) - np.mean(np.asarray(reference[s], float).mean(axis=1))
        )
        out[s] = est
    out[AVERAGE] = sum(out.values()) / len(reference)
    return {
        key: Interval(est, float(np.quantile(draws[key], 0.025)), float(np.quantile(draws[key], 0.975)))
        for key, est in out.items()
    }
