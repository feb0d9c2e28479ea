"""Statistics of per-question evaluation rows: EM with its Wilson interval, behaviour rates, failure categories.

Both the evaluation (``searchr1.evaluate`` writes the summary of one split) and the report
(``searchr1.report`` compares base and RL) read them from here; nothing here needs the agent stack.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Z_95 = 1.959963984540054  # two-sided 95% normal quantile

# Why a wrong answer was wrong, checked in this order (the first that applies wins).
FAILURE_CATEGORIES = (
    "truncated",  # the response ran out of tokens (or the engine aborted it)
    "no answer",  # the response never gave an <answer>
    "no search",  # answered without searching
    "answer not retrieved",  # searched, but no golden answer appears in the retrieved text
    "retrieved but wrong",  # a golden answer was retrieved, the model answered something else
)


def wilson_ci(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (default 95%)."""
    if n <= 0:
        raise ValueError(f"wilson_ci needs n >= 1, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_ci needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def failure_category(row: Mapping[str, Any]) -> str | None:
    """The failure category of a per-question row (None when the answer is right)."""
    if row["em"] >= 1.0:
        return None
    if row["status"] in ("truncated", "aborted"):
        return "truncated"
    if not row["answered"]:
        return "no answer"
    if row["searches"] == 0:
        return "no search"
    if not row["golden_in_retrieved"]:
        return "answer not retrieved"
    return "retrieved but wrong"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a complete JSONL file; a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing JSONL file: {path}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
    return rows


def summarize_rows(rows: Sequence[Mapping[str, Any]], *, source: str = "rows") -> dict[str, Any]:
    """EM with its Wilson 95% CI and the behaviour rates of per-question eval rows."""
    n = len(rows)
    if n == 0:
        raise ValueError(f"no evaluated questions in {source}")
    ids = [r["id"] for r in rows]
    duplicates = sorted(i for i, c in Counter(ids).items() if c > 1)
    if duplicates:
        raise ValueError(f"{source}: question ids counted twice: {duplicates[:5]}")

    def rate(key: str) -> float:
        return sum(1 for r in rows if r[key]) / n

    correct = sum(1 for r in rows if r["em"] >= 1.0)
    low, high = wilson_ci(correct, n)
    failures = Counter(c for c in (failure_category(r) for r in rows) if c is not None)
    return {
        "em": correct / n,
        "n": n,
        "correct": correct,
        "ci95": {"low": low, "high": high, "method": "wilson", "z": Z_95},
        "searched_at_least_once": sum(1 for r in rows if r["searches"] > 0) / n,
        "answered": rate("answered"),
        "format_valid": rate("format_valid"),
        # over all questions: an answer given without retrieval is not grounded
        "grounded": rate("grounded"),
        "golden_retrieved": rate("golden_in_retrieved"),
        "mean_searches": sum(r["searches"] for r in rows) / n,
        "mean_response_tokens": sum(r["response_tokens"] for r in rows) / n,
        "mean_total_response_tokens": sum(r["total_response_tokens"] for r in rows) / n,
        "status_counts": dict(sorted(Counter(r["status"] for r in rows).items())),
        "failure_counts": {c: failures[c] for c in FAILURE_CATEGORIES if failures[c]},
        "retrieval_failures": sum(r["retrieval_failures"] for r in rows),
    }


def summarize(jsonl_path: str | Path) -> dict[str, Any]:
    """``summarize_rows`` over a per-question eval JSONL file."""
    return summarize_rows(read_jsonl(jsonl_path), source=str(jsonl_path))
