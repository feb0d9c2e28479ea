"""Snakemake rule 'export_rl': a thin entry point; the job is searchr1.steps.train.export_rl, which sees only the
settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "train.export_rl")  # noqa: F821 (snakemake is injected by the script: directive)
