"""Snakemake rule 'corpus_offsets': a thin entry point; the job is searchr1.steps.retrieval.corpus_offsets,
which sees only the settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "retrieval.corpus_offsets")  # noqa: F821 (snakemake is injected by the script: directive)
