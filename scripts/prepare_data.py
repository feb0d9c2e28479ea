"""Snakemake rule 'prepare_data': a thin entry point; the job is searchr1.steps.data.prepare_data, which sees only the
settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "data.prepare_data")  # noqa: F821 (snakemake is injected by the script: directive)
