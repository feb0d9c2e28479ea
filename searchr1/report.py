"""The headline report: results/headline.md, the training plots and the base-vs-RL examples.

Inputs are the files the DAG always provides (per-question eval JSONL + summary JSON for the base and
the RL checkpoint on every split, the training metrics JSONL, optionally a learning curve); a missing
one is an error naming it. Every number is recomputed from the per-question JSONL with the same
``summarize`` the eval used, so the report and the eval files cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from searchr1 import provenance  # noqa: E402
from searchr1.compare import mean_sd  # noqa: E402
from searchr1.experiments import Run  # noqa: E402
from searchr1.fsutil import write_json_atomic, write_text_atomic  # noqa: E402
from searchr1.stats import FAILURE_CATEGORIES, failure_category, read_jsonl, summarize_rows  # noqa: E402

MODELS = ("base", "rl")  # always evaluated; eval.models adds named ones after them
MODEL_NAMES = {"base": "base", "rl": "RL"}
SPLIT_NAMES = {
    "nq_test": "NQ",
    "triviaqa_test": "TriviaQA",
    "popqa_test": "PopQA",
    "hotpotqa_test": "HotpotQA",
    "2wikimultihopqa_test": "2Wiki",
    "musique_test": "MuSiQue",
    "bamboogle_test": "Bamboogle",
    "nq": "NQ",
    "hotpotqa": "HotpotQA",
}
FIGSIZE = (7, 4)
DPI = 120
DEFAULT_EXAMPLES = 3


def split_name(split: str) -> str:
    return SPLIT_NAMES.get(split, split)


def model_name(model: str) -> str:
    return MODEL_NAMES.get(model, model)


def mean_em(summaries: Mapping[tuple[str, str], Mapping[str, Any]], model: str, splits: Sequence[str]) -> float:
    """The unweighted mean of a model's EM over the splits (the "Avg." the Search-R1 papers report)."""
    return sum(summaries[(model, s)]["em"] for s in splits) / len(splits)


def stable_hash(text: str) -> str:
    """Order key independent of process and platform (unlike ``hash``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"report input missing: {path}")
    return path


# --------------------------------------------------------------------------------------------------
# inputs


def load_eval(eval_dir: Path, model: str, split: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(per-question rows, recomputed summary, the eval's own summary JSON) of one model on one split."""
    jsonl = _require(eval_dir / model / f"{split}.jsonl")
    meta_path = _require(eval_dir / model / f"{split}.json")
    rows = read_jsonl(jsonl)
    summary = summarize_rows(rows, source=str(jsonl))
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("n") is not None and meta["n"] != summary["n"]:
        raise ValueError(f"{meta_path} says n={meta['n']} but {jsonl} holds {summary['n']} questions")
    return rows, summary, meta


def load_metrics(metrics_path: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(_require(metrics_path))
    if not rows:
        raise ValueError(f"no training steps in {metrics_path}")
    for i, row in enumerate(rows):
        for key in ("step", "reward_mean", "response_len_mean"):
            if key not in row:
                raise ValueError(f"{metrics_path}: line {i + 1} lacks {key!r}")
    return sorted(rows, key=lambda r: r["step"])


def load_curve_points(curve_path: Path, splits: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The learning-curve points of searchr1.evaluate.append_curve_point per split, sorted by step, with n
    and the 95% interval (other line formats: :func:`load_curve`)."""
    points: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    for row in read_jsonl(_require(curve_path)):
        if row.get("split") in points and "em" in row:
            points[row["split"]].append(row)
    return {s: sorted(p, key=lambda r: r["step"]) for s, p in points.items() if p}


def load_curve(curve_path: Path, splits: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Learning-curve points per split. A line is {"step", "split", "em", ...} (evaluate.append_curve_point),
    {"step", "dataset", "reward_mean", ...} (an older slime eval log hook line; its eval reward is EM), or
    {"step", "<split>" or "eval/<split>": em, ...}."""
    points: dict[str, list[tuple[int, float]]] = {s: [] for s in splits}
    for i, row in enumerate(read_jsonl(_require(curve_path))):
        step = row.get("step", row.get("rollout_id"))
        if step is None:
            raise ValueError(f"{curve_path}: line {i + 1} has no 'step'")
        if "split" in row and "em" in row:
            if row["split"] in points:
                points[row["split"]].append((int(step), float(row["em"])))
            continue
        if "dataset" in row and "reward_mean" in row:  # slime's eval log hook (searchr1.slime_plugin.log_eval)
            if row["dataset"] in points:
                points[row["dataset"]].append((int(step), float(row["reward_mean"])))
            continue
        for split in splits:
            for key in (split, f"eval/{split}"):
                if isinstance(row.get(key), (int, float)):
                    points[split].append((int(step), float(row[key])))
    return {s: sorted(p) for s, p in points.items() if p}


# --------------------------------------------------------------------------------------------------
# plots


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * v
        out.append(acc / (1.0 - weight**i))
    return out


def _smoothing_weight(n: int) -> float:
    # an effective window of ~n/10 steps, between 2 and 50
    window = min(50.0, max(2.0, n / 10))
    return 1.0 - 1.0 / window


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _step_axis(ax: Any) -> None:
    ax.set_xlabel("rollout step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_series(
    steps: Sequence[float], values: Sequence[float], path: Path, *, title: str, ylabel: str, smooth: bool = True
) -> None:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    marker = "." if len(steps) < 30 else None
    ax.plot(steps, values, color="tab:blue", alpha=0.35 if smooth else 1.0, linewidth=1, marker=marker, label="raw")
    if smooth and len(values) > 1:
        weight = _smoothing_weight(len(values))
        ax.plot(steps, ema(values, weight), color="tab:blue", linewidth=2, label=f"EMA (weight {weight:.2f})")
    _step_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    _save(fig, path)


def plot_curve(curve: Mapping[str, list[tuple[int, float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for split, points in curve.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=split_name(split))
    _step_axis(ax)
    ax.set_ylabel("exact match (greedy)")
    ax.set_ylim(0, 1)
    ax.set_title("Held-out EM during training" + ("" if curve else " (no points yet)"))
    ax.grid(alpha=0.3)
    if curve:
        ax.legend(loc="best")
    _save(fig, path)


# (plot name, metrics key, title, y label) of the per-rollout training plots
_TRAIN_PLOTS = (
    ("reward", "reward_mean", "Mean training reward per rollout step", "mean raw reward"),
    ("response_length", "response_len_mean", "Mean response length per rollout step", "model tokens per response"),
    ("searches", "searches_mean", "Mean searches per response per rollout step", "searches per response"),
)


def render_plots(
    metrics: Sequence[Mapping[str, Any]], plots_dir: Path, curve: Mapping[str, list[tuple[int, float]]] | None
) -> dict[str, Path]:
    """Write the PNGs; returns {name: path}."""
    steps = [r["step"] for r in metrics]
    paths: dict[str, Path] = {}
    for name, key, title, ylabel in _TRAIN_PLOTS:
        if name == "searches" and not all(key in r for r in metrics):
            continue  # metrics of a run that did not record searches
        paths[name] = plots_dir / f"{name}.png"
        plot_series(steps, [r[key] for r in metrics], paths[name], title=title, ylabel=ylabel)
    if curve is not None:  # a curve file without points yet (num_rollout below eval.interval): an empty plot
        paths["em_curve"] = plots_dir / "em_curve.png"
        plot_curve(curve, paths["em_curve"])
    return paths


# --------------------------------------------------------------------------------------------------
# markdown


def _fmt_em(summary: Mapping[str, Any]) -> str:
    ci = summary["ci95"]
    return f"{summary['em']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def typical_failure(rows: Sequence[Mapping[str, Any]]) -> str:
    """The most common failure category among wrong answers, with its share of them."""
    counts = Counter(c for c in (failure_category(r) for r in rows) if c is not None)
    if not counts:
        return "none (all correct)"
    # ties broken by the fixed category order, so the text is deterministic
    best = max(FAILURE_CATEGORIES, key=lambda c: (counts[c], -FAILURE_CATEGORIES.index(c)))
    return f"{best} ({_pct(counts[best] / sum(counts.values()))} of wrong)"


def headline_table(
    summaries: Mapping[tuple[str, str], Mapping[str, Any]],
    published: Mapping[str, Mapping[str, float]],
    splits: Sequence[str],
    comparable: bool,
    models: Sequence[str] = MODELS,
) -> list[str]:
    """One row per model (in ``models`` order), then RL − base; with several splits an average over them."""
    average = len(splits) > 1
    header = ["model"]
    for split in splits:
        name = split_name(split)
        header += [f"{name} EM [95% CI]", f"{name} published", f"{name} diff"]
    if average:
        header += ["average EM", "average published", "average diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pub(model: str, split: str) -> float | None:
        value = published.get(model, {}).get(split)
        return None if value is None else float(value)

    def pub_avg(model: str) -> float | None:
        values = [pub(model, s) for s in splits]
        return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]

    for model in models:
        cells = [model_name(model)]
        for split in splits:
            ours = summaries[(model, split)]["em"]
            p = pub(model, split)
            cells.append(_fmt_em(summaries[(model, split)]))
            cells.append("—" if p is None else f"{p:.3f}")
            cells.append("—" if p is None or not comparable else _signed(ours - p))
        if average:
            ours, p = mean_em(summaries, model, splits), pub_avg(model)
            cells += [
                f"{ours:.3f}",
                "—" if p is None else f"{p:.3f}",
                "—" if p is None or not comparable else _signed(ours - p),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["delta (RL − base)"]
    for split in splits:
        ours = summaries[("rl", split)]["em"] - summaries[("base", split)]["em"]
        pb, pr = pub("base", split), pub("rl", split)
        p = None if pb is None or pr is None else pr - pb
        cells += [
            _signed(ours),
            "—" if p is None else _signed(p),
            "—" if p is None or not comparable else _signed(ours - p),
        ]
    if average:
        ours = mean_em(summaries, "rl", splits) - mean_em(summaries, "base", splits)
        pb, pr = pub_avg("base"), pub_avg("rl")
        p = None if pb is None or pr is None else pr - pb
        cells += [
            _signed(ours),
            "—" if p is None else _signed(p),
            "—" if p is None or not comparable else _signed(ours - p),
        ]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def behaviour_table(
    summaries: Mapping[tuple[str, str], Mapping[str, Any]],
    rows: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    splits: Sequence[str],
    models: Sequence[str] = MODELS,
) -> list[str]:
    columns = [(m, s) for s in splits for m in models]
    header = ["behaviour"] + [f"{split_name(s)} {model_name(m)}" for m, s in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    spec = [
        ("searched at least once", lambda s, r: _pct(s["searched_at_least_once"])),
        ("mean searches", lambda s, r: f"{s['mean_searches']:.2f}"),
        ("grounded (answer in retrieved text)", lambda s, r: _pct(s["grounded"])),
        ("golden answer retrieved", lambda s, r: _pct(s["golden_retrieved"])),
        ("format valid", lambda s, r: _pct(s["format_valid"])),
        ("answered", lambda s, r: _pct(s["answered"])),
        ("mean response tokens (model)", lambda s, r: f"{s['mean_response_tokens']:.1f}"),
        ("truncated", lambda s, r: _pct(s["status_counts"].get("truncated", 0) / s["n"])),
        ("typical failure", lambda s, r: typical_failure(r)),
    ]
    for label, cell in spec:
        lines.append("| " + " | ".join([label] + [cell(summaries[c], rows[c]) for c in columns]) + " |")
    return lines


def training_summary(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    n = len(metrics)
    k = max(1, n // 10)
    first, last = metrics[0], metrics[-1]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    wall = sum(float(r.get("wall_time_s", 0.0)) for r in metrics)
    lines = [
        f"- rollout steps: {n} (steps {first['step']}–{last['step']})",
        f"- training reward: first step {first['reward_mean']:.3f}, last step {last['reward_mean']:.3f}; "
        f"mean of the first {k} steps {mean(metrics[:k], 'reward_mean'):.3f}, of the last {k} "
        f"{mean(metrics[-k:], 'reward_mean'):.3f}",
        f"- response length (model tokens): first {first['response_len_mean']:.1f}, "
        f"last {last['response_len_mean']:.1f}",
    ]
    if all("em_mean" in r for r in metrics):  # the same rollouts' exact match (differs under a shaped reward)
        lines.append(
            f"- exact match of the training rollouts: first step {first['em_mean']:.3f}, last step "
            f"{last['em_mean']:.3f}; mean of the first {k} steps {mean(metrics[:k], 'em_mean'):.3f}, of the last "
            f"{k} {mean(metrics[-k:], 'em_mean'):.3f}"
        )
    if "searches_mean" in first and "searches_mean" in last:
        lines.append(f"- searches per response: first {first['searches_mean']:.2f}, last {last['searches_mean']:.2f}")
    lines.append(f"- training wall time (sum of per-step times): {_duration(wall)}")
    return lines


def curve_summary(points: Mapping[str, Sequence[Mapping[str, Any]]], every: int | None) -> list[str]:
    """The learning curve in the headline: per split, EM [95% CI] at the first and the last point."""
    if not points:
        return []
    n = (
        max(p["n"] for ps in points.values() for p in ps if "n" in p)
        if any("n" in p for ps in points.values() for p in ps)
        else None
    )
    head = "- learning curve (greedy EM" + (f" on the first {n} questions of each split" if n else "")
    head += (f", every {every} rollouts" if every else "") + "; plot below):"
    lines = [head]
    for split, ps in points.items():

        def at(p: Mapping[str, Any]) -> str:
            ci = f" [{p['ci95_low']:.3f}, {p['ci95_high']:.3f}]" if "ci95_low" in p else ""
            return f"step {p['step']} {p['em']:.3f}{ci}"

        lines.append(f"  - {split_name(split)}: {len(ps)} points, {at(ps[0])} → {at(ps[-1])}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _fence(text: str) -> str:
    # a fence longer than any backtick run in the text, so model output cannot break out of it
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _example(base: Mapping[str, Any], rl: Mapping[str, Any], names: tuple[str, str] = ("base", "RL")) -> list[str]:
    def verdict(r: Mapping[str, Any]) -> str:
        answer = f"answer {r['extracted_answer']!r}"
        if r.get("response_answer") is None and r["extracted_answer"] is not None:
            answer += " (the prompt's own example: the response gives none)"
        return f"EM {r['em']:.0f}, {answer}, {r['searches']} search(es), {r['status']}"

    return [
        f"#### `{base['id']}`: {base['question']}",
        "",
        f"Golden answers: {', '.join(repr(g) for g in base['golden_answers'])}",
        "",
        f"**{names[0]}** ({verdict(base)})",
        "",
        _fence(base["response"]),
        "",
        f"**{names[1]}** ({verdict(rl)})",
        "",
        _fence(rl["response"]),
        "",
    ]


def examples_markdown(
    rows: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    splits: Sequence[str],
    n_examples: int,
    compare: Sequence[str],
) -> str:
    first, second = compare
    a_name, b_name = model_name(first), model_name(second)
    a_cap = a_name[:1].upper() + a_name[1:]
    lines = [
        f"# {a_cap} vs {b_name}: example trajectories",
        "",
        f"Greedy trajectories of {a_name} and {b_name} (eval.compare) on the same questions. "
        "Each block is the response (the model's turns and the retrieved `<information>`); "
        "the prompt before it is the chat-templated Search-R1 instruction with the question. "
        "The verdict is the seed's: the last `<answer>` of prompt + response. "
        "Questions are picked in the order of a SHA-256 hash of their id (deterministic, not random).",
        "",
    ]
    for split in splits:
        base_rows = {r["id"]: r for r in rows[(first, split)]}
        rl_rows = {r["id"]: r for r in rows[(second, split)]}
        ids = sorted(base_rows, key=stable_hash)
        improved = [i for i in ids if base_rows[i]["em"] < 1.0 <= rl_rows[i]["em"]]
        rl_wrong = [i for i in ids if rl_rows[i]["em"] < 1.0]
        lines += [f"## {split_name(split)}", ""]
        for title, chosen in ((f"{a_cap} wrong, {b_name} right", improved), (f"{b_name} wrong", rl_wrong)):
            lines += [f"### {title} ({min(n_examples, len(chosen))} of {len(chosen)})", ""]
            if not chosen:
                lines += ["None.", ""]
            for i in chosen[:n_examples]:
                lines += _example(base_rows[i], rl_rows[i], (a_name, b_name))
    return "\n".join(lines)


def _rel(target: Path, start_file: Path) -> str:
    return Path(os.path.relpath(target, start_file.parent)).as_posix()


def render_report(
    *,
    eval_dir: str | Path,
    metrics_path: str | Path,
    published: Mapping[str, Mapping[str, float]],
    splits: Sequence[str],
    out_md: str | Path,
    examples_md: str | Path,
    plots_dir: str | Path,
    scale: str,
    record: Mapping[str, Any],
    compare: Sequence[str],
    final_path: str | Path | None = None,
    provenance_json: str | Path | None = None,
    curve_path: str | Path | None = None,
    n_examples: int = DEFAULT_EXAMPLES,
    models: Sequence[str] = MODELS,
    curve_every: int | None = None,
) -> None:
    """Render results/headline.md, the plots and results/examples.md from the eval and training files.

    ``record`` is the report step's own provenance; every input's provenance (the eval summaries,
    ``final_path``) must agree on every setting they share, else :class:`MixedSettingsError` names the key.
    All records go to ``provenance_json`` and are listed in the headline.
    """
    if scale not in ("full", "toy"):
        raise ValueError(f"scale must be 'full' or 'toy', got {scale!r}")
    if not splits:
        raise ValueError("no splits to report")
    models = list(dict.fromkeys([*MODELS, *models]))
    if len(compare) != 2 or any(m not in models for m in compare):
        raise ValueError(f"compare must name two of the evaluated models {models}, got {list(compare)}")
    eval_dir, out_md, examples_md, plots_dir = Path(eval_dir), Path(out_md), Path(examples_md), Path(plots_dir)
    metrics = load_metrics(Path(metrics_path))
    curve = load_curve(Path(curve_path), splits) if curve_path is not None else None
    curve_points = load_curve_points(Path(curve_path), splits) if curve_path is not None else {}

    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    metas: dict[tuple[str, str], dict[str, Any]] = {}
    for split in splits:
        for model in models:
            rows[(model, split)], summaries[(model, split)], metas[(model, split)] = load_eval(eval_dir, model, split)
        base_ids = {r["id"] for r in rows[("base", split)]}
        for model in models[1:]:
            ids = {r["id"] for r in rows[(model, split)]}
            if base_ids != ids:
                raise ValueError(
                    f"base and {model_name(model)} were evaluated on different questions of {split} "
                    f"({len(base_ids)} vs {len(ids)} ids, {len(base_ids ^ ids)} differ): "
                    f"{eval_dir / 'base' / (split + '.jsonl')} vs {eval_dir / model / (split + '.jsonl')}"
                )

    records: dict[str, Any] = {}
    if final_path is not None:
        records[str(final_path)] = provenance.of_json(final_path)
    for split in splits:
        for model in models:
            records[str(eval_dir / model / f"{split}.json")] = metas[(model, split)].get("provenance")
    provenance.check_consistent({**records, "this report": record})

    plots = render_plots(metrics, plots_dir, curve)
    comparable = scale == "full"
    n_text = ", ".join(f"{split_name(s)} {summaries[('rl', s)]['n']}" for s in splits)
    lines = [
        *_headline_top(scale, record, metas[("rl", splits[0])], n_text),
        "",
        "## Exact match",
        "",
        *headline_table(summaries, published, splits, comparable, models),
        "",
        "EM is Search-R1's exact match (the last `<answer>` of prompt + response, SQuAD-normalised), the "
        "training reward when every reward.* score is 0; "
        "the interval is the 95% Wilson score interval. Published numbers are the seed run's "
        "(Qwen2.5-3B, slime GRPO, 3000 rollouts). "
        + (
            "diff = ours − published."
            if comparable
            else "**At toy scale the published numbers are not comparable** (different model, data and "
            "training length); they are shown for reference only and no difference is computed."
        ),
        "",
        "## Behaviour",
        "",
        *behaviour_table(summaries, rows, splits, models),
        "",
        "Rates are over all questions of the split. *grounded*: the extracted answer appears (normalised) in "
        "the retrieved text; *golden answer retrieved*: a golden answer appears in the retrieved text. "
        "Failure categories among wrong answers (first that applies): " + "; ".join(FAILURE_CATEGORIES) + ".",
        "",
        "## Training",
        "",
        *training_summary(metrics),
        *curve_summary(curve_points, curve_every),
        "",
        "## Plots",
        "",
    ]
    titles = {
        "reward": "Mean training reward per rollout step",
        "response_length": "Mean response length per rollout step",
        "searches": "Mean searches per rollout step",
        "em_curve": "Held-out EM during training",
    }
    for name, path in plots.items():
        lines += [f"![{titles[name]}]({_rel(path, out_md)})", ""]
    pair = " vs ".join(model_name(m) for m in compare)
    lines += ["## Examples", "", f"{pair} trajectories: [{examples_md.name}]({_rel(examples_md, out_md)})", ""]
    lines += provenance_section(records, record, provenance_json, out_md)

    out_md.parent.mkdir(parents=True, exist_ok=True)
    examples_md.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(examples_md, examples_markdown(rows, splits, n_examples, compare) + "\n")
    if provenance_json is not None:
        write_json_atomic(provenance_json, {"provenance": dict(record), "inputs": records})
    write_text_atomic(out_md, "\n".join(lines))


def _headline_top(scale: str, record: Mapping[str, Any], eval_meta: Mapping[str, Any], n_text: str) -> list[str]:
    """The headline's title and its scale, provenance and evaluation lines (one run or several)."""
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    toy_note = "" if scale == "full" else " (the offline toy world: tiny model, synthetic questions)"
    return [
        "# Search-R1 on slime: headline results",
        "",
        f"- scale: **{scale}**{toy_note}",
        f"- settings hash `{record['settings_hash']}`, code {_code_text(record)}; rendered {today} "
        "(every input's provenance: the Provenance section below)",
        f"- evaluation: temperature {eval_meta.get('temperature', 0.0)} (greedy when 0), 1 sample per question, "
        f"engine `{eval_meta.get('engine', '?')}`; questions per split: {n_text}",
    ]


def _code_text(record: Mapping[str, Any]) -> str:
    code = record.get("code") or {}
    git = code.get("git")
    return (f"git `{git}`, " if git else "") + f"source `{code.get('source_sha', '?')}`"


def provenance_section(
    records: Mapping[str, Mapping[str, Any] | None],
    record: Mapping[str, Any],
    provenance_json: str | Path | None,
    out_md: Path,
    checked: str = "Every input was made under the same value of every setting they share (checked; the report "
    "refuses mixed inputs and names the key).",
) -> list[str]:
    """What made each input: its step, settings hash and code version (the full records in provenance_json)."""
    lines = [
        "## Provenance",
        "",
        f"{checked} Settings hash: sha256 of the step's declared settings.",
        "",
        "| file | step | settings hash | code |",
        "|---|---|---|---|",
    ]
    for label, rec in records.items():
        if rec:
            lines.append(
                f"| `{label}` | {rec.get('step', '?')} | `{rec.get('settings_hash', '?')}` | {_code_text(rec)} |"
            )
        else:
            lines.append(f"| `{label}` | ? | (no provenance recorded) | ? |")
    lines.append(f"| this report | {record.get('step')} | `{record['settings_hash']}` | {_code_text(record)} |")
    codes = {(rec.get("code") or {}).get("source_sha") for rec in records.values() if rec}
    if len(codes) > 1:
        lines += ["", f"**Note:** the inputs were made by {len(codes)} different code versions (listed above)."]
    if provenance_json is not None:
        lines += [
            "",
            f"Full records (settings of every step, operational settings, inputs): "
            f"[{Path(provenance_json).name}]({_rel(Path(provenance_json), out_md)})",
        ]
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# experiments x seeds (searchr1.experiments): the headline of several training runs


@dataclass(frozen=True)
class RunInputs:
    """One training run's report inputs: its run, training metrics, final record and learning curve."""

    run: Run
    metrics: Path
    final: Path
    curve: Path | None = None


BEHAVIOUR_ROWS = (
    # (label, row -> bool): per-question rates over the split, from the eval JSONL
    ("format valid (Search-R1's is_valid_sequence)", lambda r: bool(r["format_valid"])),
    ("closes `</think>`", lambda r: "</think>" in r["response"]),
    ("searched at least once", lambda r: r["searches"] > 0),
    ("answered", lambda r: bool(r["answered"])),
)


def _rate(rows: Sequence[Mapping[str, Any]], test: Any) -> float:
    return sum(1 for r in rows if test(r)) / len(rows)


def _mean_sd_text(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    mean, sd = mean_sd(values)
    text = fmt.format(mean) + ("" if sd is None else " ± " + fmt.format(sd))
    if len(values) > 1:
        text += " (" + ", ".join(fmt.format(v) for v in values) + ")"
    return text


def _em_vector(rows: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> list[float]:
    by_id = {r["id"]: float(r["em"]) for r in rows}
    return [by_id[i] for i in ids]


def plot_bands(
    series: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]],
    ax: Any,
    *,
    ylabel: str,
    title: str,
) -> None:
    """Per experiment, the mean over its seeds (the steps all its seeds have) with the min-max range shaded."""
    for i, (name, runs) in enumerate(series.items()):
        common = sorted(set.intersection(*(set(steps) for steps, _ in runs))) if runs else []
        if not common:
            continue
        values = np.array([[dict(zip(steps, vals))[s] for s in common] for steps, vals in runs])
        color = f"C{i}"
        label = f"{name} (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''}"
        label += ", range shaded)" if len(runs) > 1 else ")"
        ax.plot(
            common, values.mean(axis=0), color=color, linewidth=2, marker="." if len(common) < 30 else None, label=label
        )
        if len(runs) > 1:
            ax.fill_between(common, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2)
    _step_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def render_experiment_plots(
    metrics: Mapping[Run, Sequence[Mapping[str, Any]]],
    curves: Mapping[Run, Mapping[str, list[tuple[int, float]]]] | None,
    splits: Sequence[str],
    plots_dir: Path,
) -> dict[str, Path]:
    """reward.png (the training reward, shaped, and the EM of the same rollouts when recorded),
    response_length.png and em_curve.png (held-out EM per split), each per experiment over its seeds."""

    def series(key: str) -> dict[str, list[tuple[list[float], list[float]]]]:
        out: dict[str, list[tuple[list[float], list[float]]]] = {}
        for run, rows in metrics.items():
            if all(key in r for r in rows):
                out.setdefault(run.experiment, []).append(([r["step"] for r in rows], [r[key] for r in rows]))
        return out

    paths: dict[str, Path] = {}
    with_em = bool(series("em_mean"))
    fig, axes = plt.subplots(
        1, 2 if with_em else 1, figsize=(FIGSIZE[0] * (2 if with_em else 1), FIGSIZE[1]), squeeze=False
    )
    plot_bands(
        series("reward_mean"),
        axes[0][0],
        ylabel="mean training reward",
        title="Training reward per rollout step (reward_mean)",
    )
    if with_em:
        plot_bands(
            series("em_mean"), axes[0][1], ylabel="mean exact match", title="Exact match of the same rollouts (em_mean)"
        )
    paths["reward"] = plots_dir / "reward.png"
    _save(fig, paths["reward"])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    plot_bands(
        series("response_len_mean"),
        ax,
        ylabel="model tokens per response",
        title="Mean response length per rollout step",
    )
    paths["response_length"] = plots_dir / "response_length.png"
    _save(fig, paths["response_length"])
    if curves is not None:
        fig, axes = plt.subplots(1, len(splits), figsize=(FIGSIZE[0] * len(splits) * 0.7, FIGSIZE[1]), squeeze=False)
        for ax, split in zip(axes[0], splits):
            by_exp: dict[str, list[tuple[list[float], list[float]]]] = {}
            for run, curve in curves.items():
                if split in curve:
                    by_exp.setdefault(run.experiment, []).append(
                        ([p[0] for p in curve[split]], [p[1] for p in curve[split]])
                    )
            plot_bands(
                by_exp, ax, ylabel="exact match (greedy)", title=f"Held-out EM during training: {split_name(split)}"
            )
            ax.set_ylim(0, 1)
        paths["em_curve"] = plots_dir / "em_curve.png"
        _save(fig, paths["em_curve"])
    return paths


def render_experiments_report(
    *,
    eval_dir: Path,
    runs: Sequence[RunInputs],
    experiments: Mapping[str, Mapping[str, Any]],
    published: Mapping[str, Mapping[str, float]],
    splits: Sequence[str],
    out_md: Path,
    examples_md: Path,
    plots_dir: Path,
    scale: str,
    record: Mapping[str, Any],
    provenance_json: Path | None,
    other_models: Sequence[str],
    compare: Sequence[str],
    bootstrap_seed: int,
    n_examples: int = DEFAULT_EXAMPLES,
    curve_every: int | None = None,
) -> None:
    """The headline of several runs (experiments x seeds): EM per experiment as mean ± sd over seeds with each
    seed's value, the difference to the first experiment with its two-level bootstrap interval, behaviour
    rates, training plots per experiment, and every run's provenance (each run checked on its own)."""
    from searchr1.compare import AVERAGE, BOOTSTRAP_SAMPLES, METHOD, difference
    from searchr1.experiments import by_experiment, override_keys, overrides_text

    groups = by_experiment([ri.run for ri in runs])
    names = list(groups)
    shared = ["base", *other_models]
    run_models = [ri.run.model for ri in runs]
    models = [*shared, *run_models]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    metas: dict[tuple[str, str], dict[str, Any]] = {}
    ids: dict[str, list[str]] = {}
    for split in splits:
        for model in models:
            rows[(model, split)], summaries[(model, split)], metas[(model, split)] = load_eval(eval_dir, model, split)
        ids[split] = sorted(r["id"] for r in rows[("base", split)])
        for model in models[1:]:
            got = sorted(r["id"] for r in rows[(model, split)])
            if got != ids[split]:
                raise ValueError(
                    f"base and {model} were evaluated on different questions of {split} "
                    f"({len(ids[split])} vs {len(got)} ids): {eval_dir / 'base' / (split + '.jsonl')} vs "
                    f"{eval_dir / model / (split + '.jsonl')}"
                )

    # provenance: shared evals agree among themselves; each run agrees with itself and with the shared evals
    # on every key its experiment does not change; the runs of one experiment differ only in train.seed.
    shared_records = {str(eval_dir / m / f"{s}.json"): metas[(m, s)].get("provenance") for m in shared for s in splits}
    provenance.check_consistent({**shared_records, "this report": record})
    records: dict[str, Any] = dict(shared_records)
    run_records: dict[Run, dict[str, Any]] = {}
    for ri in runs:
        own = {str(ri.final): provenance.of_json(ri.final)}
        own.update(
            {str(eval_dir / ri.run.model / f"{s}.json"): metas[(ri.run.model, s)].get("provenance") for s in splits}
        )
        provenance.check_consistent(own)
        changed = override_keys(experiments[ri.run.experiment])
        provenance.check_consistent({**shared_records, **own}, ignore=changed)
        run_records[ri.run] = own
        records.update(own)
    for group in groups.values():
        provenance.check_consistent(
            {label: rec for run in group for label, rec in run_records[run].items()}, ignore=["train.seed"]
        )

    metrics = {ri.run: load_metrics(ri.metrics) for ri in runs}
    curves = None
    if any(ri.curve is not None for ri in runs):
        curves = {ri.run: load_curve(ri.curve, splits) for ri in runs if ri.curve is not None}
    plots = render_experiment_plots(metrics, curves, splits, plots_dir)

    comparable = scale == "full"
    n_text = ", ".join(f"{split_name(s)} {len(ids[s])}" for s in splits)
    seeds_of = {name: [run.seed for run in group] for name, group in groups.items()}
    average = len(splits) > 1
    lines = [
        *_headline_top(scale, record, metas[(run_models[0], splits[0])], n_text),
        f"- {len(names)} experiment(s) x their seeds = {len(runs)} training runs; the first, `{names[0]}`, is "
        "the reference of the differences",
        "",
        "## Experiments",
        "",
        "| experiment | changes from the config | training seeds |",
        "|---|---|---|",
        *(
            f"| `{name}` | {overrides_text(experiments[name])} | {', '.join(map(str, seeds_of[name]))} |"
            for name in names
        ),
        "",
        "## Exact match",
        "",
    ]
    header = ["model", *(f"{split_name(s)} EM" for s in splits), *(["average EM"] if average else [])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in shared:
        cells = [model_name(model)] + [_fmt_em(summaries[(model, s)]) for s in splits]
        if average:
            cells.append(f"{mean_em(summaries, model, splits):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    for name, group in groups.items():
        cells = [f"`{name}` ({len(group)} seed{'s' if len(group) > 1 else ''})"]
        for s in splits:
            cells.append(_mean_sd_text([summaries[(run.model, s)]["em"] for run in group]))
        if average:
            cells.append(_mean_sd_text([mean_em(summaries, run.model, splits) for run in group]))
        lines.append("| " + " | ".join(cells) + " |")
    pub_rl = published.get("rl", {})
    if pub_rl and all(s in pub_rl for s in splits):
        cells = ["published RL (seed run)", *(f"{float(pub_rl[s]):.3f}" for s in splits)]
        if average:
            cells.append(f"{sum(float(pub_rl[s]) for s in splits) / len(splits):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Base and other named models: EM [95% Wilson interval], evaluated once. Experiments: mean ± sd over "
        "the training seeds (sample sd), then each seed's EM in seed order. EM is Search-R1's evaluation "
        "reward (the last `<answer>` of prompt + response, SQuAD-normalised exact match), whatever reward the "
        "experiment trained on."
        + ("" if comparable else " **At toy scale the published numbers are not comparable.**"),
        "",
    ]
    if len(names) > 1:
        ref = names[0]

        def matrices(name: str) -> dict[str, list[list[float]]]:
            return {s: [_em_vector(rows[(run.model, s)], ids[s]) for run in groups[name]] for s in splits}

        lines += [f"## Difference to `{ref}`", ""]
        header = [
            "experiment",
            *(f"{split_name(s)} ΔEM [95% CI]" for s in splits),
            *(["average ΔEM [95% CI]"] if average else []),
        ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names[1:]:
            diff = difference(matrices(ref), matrices(name), seed=bootstrap_seed)
            keys = [*splits, *([AVERAGE] if average else [])]
            cells = [f"`{name}` − `{ref}`"] + [
                f"{_signed(diff[k].estimate)} [{_signed(diff[k].low)}, {_signed(diff[k].high)}]" for k in keys
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "ΔEM: the experiment's mean EM over its seeds minus the reference's. Interval: "
            + METHOD.format(samples=BOOTSTRAP_SAMPLES)
            + f" Bootstrap seed: {bootstrap_seed} (the config's seed). An interval that contains 0 shows no "
            "difference at this number of seeds and questions.",
            "",
        ]
    lines += ["## Behaviour", ""]
    columns = [(m, s) for s in splits for m in ["base", *names, *other_models]]
    header = ["behaviour"] + [f"{split_name(s)} {model_name(m) if m in shared else '`' + m + '`'}" for m, s in columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, test in BEHAVIOUR_ROWS:
        cells = [label]
        for m, s in columns:
            if m in shared:
                cells.append(_pct(_rate(rows[(m, s)], test)))
            else:
                values = [_rate(rows[(run.model, s)], test) for run in groups[m]]
                mean, sd = mean_sd(values)
                cells.append(_pct(mean) + ("" if sd is None else f" ± {100 * sd:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Rates over all questions of the split; experiments: mean ± sd over their seeds. *format valid*: the "
        "whole assistant turn passes Search-R1's `is_valid_sequence` (think, then search/information/think "
        "blocks, then answer, nothing else); *closes `</think>`*: the response holds at least one `</think>`.",
        "",
        "## Training",
        "",
    ]
    for name, group in groups.items():
        first = [metrics[run][0]["reward_mean"] for run in group]
        last = [metrics[run][-1]["reward_mean"] for run in group]
        steps = [len(metrics[run]) for run in group]
        lines.append(
            f"- `{name}`: {min(steps)}–{max(steps)} rollout steps per seed; training reward (reward_mean) first "
            f"step {_mean_sd_text(first)}, last step {_mean_sd_text(last)}"
        )
        if curves is not None:
            for s in splits:
                pts = [curves[run].get(s, []) for run in group if run in curves]
                if pts and all(pts):
                    lines.append(
                        f"  - held-out {split_name(s)} EM (learning curve) step {pts[0][0][0]}: "
                        f"{_mean_sd_text([p[0][1] for p in pts])} → step {pts[0][-1][0]}: "
                        f"{_mean_sd_text([p[-1][1] for p in pts])}"
                    )
    titles = {
        "reward": "Training reward per rollout step, per experiment",
        "response_length": "Mean response length per rollout step, per experiment",
        "em_curve": "Held-out EM during training, per experiment",
    }
    lines += ["", "## Plots", ""]
    for name, path in plots.items():
        lines += [f"![{titles[name]}]({_rel(path, out_md)})", ""]
    pair = [run_models[0] if m == "rl" else m for m in compare]
    lines += [
        "## Examples",
        "",
        f"{' vs '.join(pair)} trajectories (eval.compare; `rl` is the first run, `{run_models[0]}`): "
        f"[{examples_md.name}]({_rel(examples_md, out_md)})",
        "",
    ]
    lines += provenance_section(
        records,
        record,
        provenance_json,
        out_md,
        checked="Checked: the base and named models' evaluations agree on every setting they share; each run's "
        "training and evaluations agree among themselves, and with those on every setting its experiment does "
        "not change; the runs of one experiment differ only in train.seed (the report refuses mixed inputs and "
        "names the key).",
    )
    out_md.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(examples_md, examples_markdown(rows, splits, n_examples, pair) + "\n")
    if provenance_json is not None:
        write_json_atomic(provenance_json, {"provenance": dict(record), "inputs": records})
    write_text_atomic(out_md, "\n".join(lines))
