"""Report stage: the headline table, plots and the examples of eval.compare, with every input's provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from searchr1.steps.settings import StepSettings


def _paths(value: Any) -> list[str]:
    """A named input: one path, or a list of them (one per run)."""
    return [value] if isinstance(value, str) else list(value)


def report(cfg: StepSettings, *, inputs, outputs, **_: Any) -> None:
    from searchr1.experiments import runs
    from searchr1.report import RunInputs, render_experiments_report, render_report

    cfg_runs = runs(cfg)
    evals = _paths(inputs["evals"])
    metrics, finals = _paths(inputs["metrics"]), _paths(inputs["final"])
    # declared when eval.interval turns the learning curve on; one per run, in the order of the runs
    curves = _paths(inputs["curve"]) if "curve" in inputs else [None] * len(cfg_runs)
    if not len(cfg_runs) == len(metrics) == len(finals) == len(curves):
        raise ValueError(f"the report has {len(metrics)} runs' inputs for the {len(cfg_runs)} runs of the config")
    eval_dir = Path(evals[0]).parents[1]
    common = dict(
        eval_dir=eval_dir,
        # the configured models' published numbers (base, rl and any eval.models entry given one)
        published={model: dict(values) for model, values in cfg["published"].items()},
        splits=cfg["eval"]["splits"],
        out_md=Path(outputs["headline"]),
        examples_md=Path(outputs["examples"]),
        plots_dir=Path(outputs["reward"]).parent,
        provenance_json=Path(outputs["provenance"]),
        scale=cfg["scale"],
        record=cfg.record(),
        curve_every=cfg["eval"]["interval"],
    )
    if len(cfg_runs) == 1:  # the single run: its headline as it has always been
        render_report(
            **common,
            metrics_path=metrics[0],
            final_path=finals[0],
            curve_path=curves[0],
            models=["base", "rl", *cfg["eval"]["models"]],
            compare=list(cfg["eval"]["compare"]),
        )
        return
    render_experiments_report(
        **common,
        runs=[
            RunInputs(run, Path(m), Path(f), Path(c) if c else None)
            for run, m, f, c in zip(cfg_runs, metrics, finals, curves)
        ],
        experiments={name: dict(overrides) for name, overrides in cfg["experiments"].items()},
        other_models=list(cfg["eval"]["models"]),
        compare=list(cfg["eval"]["compare"]),
        bootstrap_seed=cfg["seed"],
    )
