"""Snakemake rule 'download_qa': a thin entry point; the job is searchr1.steps.data.download_qa, which sees only the
settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "data.download_qa")  # noqa: F821 (snakemake is injected by the script: directive)
