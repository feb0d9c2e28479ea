"""Snakemake rule 'toy_warm_start': a thin entry point; the job is searchr1.steps.toy.toy_warm_start,
which sees only the settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "toy.toy_warm_start")  # noqa: F821 (snakemake is injected by the script: directive)
