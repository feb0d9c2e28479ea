"""Snakemake rule 'fetch_encoder': a thin entry point; the job is searchr1.steps.retrieval.fetch_encoder,
which sees only the settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "retrieval.fetch_encoder")  # noqa: F821 (snakemake is injected by the script: directive)
