"""Snakemake rule 'evaluate': a thin entry point; the job is searchr1.steps.evaluate.evaluate, which sees only the
settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "evaluate.evaluate")  # noqa: F821 (snakemake is injected by the script: directive)
