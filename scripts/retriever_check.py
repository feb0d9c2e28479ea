"""Snakemake rule 'retriever_check': a thin entry point; the job is searchr1.steps.retrieval.retriever_check,
which sees only the settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "retrieval.retriever_check")  # noqa: F821 (snakemake is injected by the script: directive)
