"""Snakemake rule 'container_image': a thin entry point; the job is searchr1.steps.train.container_image, which
sees only the settings the rule declares in params:."""

from searchr1.steps import run_step

run_step(snakemake, "train.container_image")  # noqa: F821 (snakemake is injected by the script: directive)
