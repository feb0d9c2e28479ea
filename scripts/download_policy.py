"""Snakemake rule 'download_policy': a thin entry point; the job is searchr1.steps.data.download_policy,
which sees only the settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "data.download_policy")  # noqa: F821 (snakemake is injected by the script: directive)
