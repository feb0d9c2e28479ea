"""Report stage: the headline table, plots and the examples of eval.compare, with every input's provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from searchr1.steps.settings import StepSettings


def report(cfg: StepSettings, *, inputs, outputs, **_: Any) -> None:
    from searchr1.report import render_report

    curve = inputs.get("curve")  # declared when eval.interval turns the learning curve on
    evals = inputs["evals"] if isinstance(inputs["evals"], list) else [inputs["evals"]]
    render_report(
        eval_dir=Path(evals[0]).parents[1],
        metrics_path=inputs["metrics"],
        final_path=inputs["final"],
        # the configured models' published numbers (base, rl and any eval.models entry given one)
        published={model: dict(values) for model, values in cfg["published"].items()},
        splits=cfg["eval"]["splits"],
        out_md=outputs["headline"],
        examples_md=outputs["examples"],
        plots_dir=Path(outputs["reward"]).parent,
        provenance_json=outputs["provenance"],
        scale=cfg["scale"],
        record=cfg.record(),
        curve_path=curve,
        curve_every=cfg["eval"]["interval"],
        models=["base", "rl", *cfg["eval"]["models"]],
        compare=list(cfg["eval"]["compare"]),
    )
