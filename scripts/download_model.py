"""Snakemake rules 'download_model_<name>': a thin entry point; the job is searchr1.steps.data.download_model, which
sees only the settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "data.download_model")  # noqa: F821 (snakemake is injected by the script: directive)
