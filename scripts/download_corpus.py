"""Snakemake rule 'download_corpus': a thin entry point; the job is searchr1.steps.retrieval.download_corpus,
which sees only the settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "retrieval.download_corpus")  # noqa: F821 (snakemake is injected by the script: directive)
