"""The Snakemake DAG: dry-runs of both configs and profiles, lint, and config errors surfaced by Snakemake.

Snakemake's command line runs in this process (helpers.snakemake), except in the first test, which runs it as the
user does, as its own process, and times it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, copy_workflow, job_counts, snakemake

FULL_JOBS = {
    "download_qa": 1,
    "prepare_data": 1,
    "download_corpus": 1,
    "corpus_offsets": 1,
    "download_index": 1,
    "fetch_encoder": 1,
    "download_policy": 1,
    "retriever_check": 1,
    "train": 1,
    "export_rl": 1,
    "evaluate": 4,
    "report": 1,
    "container_image": 1,
}
TOY_JOBS = {
    "toy_world": 1,
    "prepare_data": 1,
    "corpus_offsets": 1,
    "build_index": 1,
    "fetch_encoder": 1,
    "toy_policy_init": 1,
    "toy_warm_start": 1,
    "retriever_check": 1,
    "train": 1,
    "export_rl": 1,
    "evaluate": 6,
    "report": 1,  # base, rl and eval.models' init (the policy before warm start) x 2 splits
}


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow without results, so dry-runs see a fresh clone."""
    return copy_workflow(tmp_path)


def test_full_dry_run_lists_every_step_quickly(workdir):
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "results/headline.md"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
    )
    elapsed = time.monotonic() - start
    assert res.returncode == 0, res.stderr + res.stdout
    assert job_counts(res.stdout) == FULL_JOBS
    assert elapsed < 10, f"dry-run took {elapsed:.1f} s"
    # The exact slime command is part of the plan.
    assert "ray job submit" in res.stdout and "searchr1.slime_plugin.generate" in res.stdout


def test_toy_dry_run(workdir):
    res = snakemake("--profile", "profiles/toy", "-n", "results/headline.md", cwd=workdir)
    assert res.returncode == 0, res.stderr + res.stdout
    assert job_counts(res.stdout) == TOY_JOBS


PUBLISHED_MODEL = (
    "eval:\n  models:\n"
    "    searchr1_7b: {repo: PeterJinGo/SearchR1-nq_hotpotqa_train-qwen2.5-7b-em-ppo, revision: main}\n"
)


def test_named_model_dry_run(workdir):
    """eval.models: one more download and an evaluate job per split; evaluating it alone trains nothing."""
    (workdir / "extra.yaml").write_text(PUBLISHED_MODEL)
    res = snakemake("-n", "--configfile", "config.yaml", "extra.yaml", "--", "results/headline.md", cwd=workdir)
    assert res.returncode == 0, res.stderr + res.stdout
    assert job_counts(res.stdout) == {**FULL_JOBS, "evaluate": 6, "download_model_searchr1_7b": 1}
    res = snakemake(
        "-n", "--configfile", "config.yaml", "extra.yaml", "--", "results/eval/searchr1_7b/nq_test.json", cwd=workdir
    )
    assert res.returncode == 0, res.stderr + res.stdout
    counts = job_counts(res.stdout)
    assert counts["evaluate"] == 1 and counts["download_model_searchr1_7b"] == 1
    assert not {"train", "export_rl", "download_policy", "report"} & set(counts)


def test_published_model_on_the_seven_benchmarks_dry_run(workdir):
    """config.yaml + one published checkpoint + all seven splits: models x splits evaluate jobs."""
    seven = [
        "nq_test",
        "triviaqa_test",
        "popqa_test",
        "hotpotqa_test",
        "2wikimultihopqa_test",
        "musique_test",
        "bamboogle_test",
    ]
    (workdir / "extra.yaml").write_text(PUBLISHED_MODEL + f"  splits: {seven}\n")
    res = snakemake("-n", "--configfile", "config.yaml", "extra.yaml", "--", "results/headline.md", cwd=workdir)
    assert res.returncode == 0, res.stderr + res.stdout
    assert job_counts(res.stdout) == {**FULL_JOBS, "evaluate": 3 * 7, "download_model_searchr1_7b": 1}
    for model in ("base", "rl", "searchr1_7b"):
        for split in seven:
            assert f"results/eval/{model}/{split}.json" in res.stdout


def test_index_build_switch(workdir):
    res = snakemake("-n", "results/headline.md", "--config", "retriever={'index': {'source': 'build'}}", cwd=workdir)
    assert res.returncode == 0, res.stderr + res.stdout
    counts = job_counts(res.stdout)
    assert counts.get("build_index") == 1 and "download_index" not in counts


def eval_messages(stdout: str) -> list[str]:
    """The evaluate jobs' messages in a dry run (a job with a message prints it instead of its resources)."""
    return re.findall(r"^Job \d+: (evaluate .*)$", stdout, flags=re.M)


def test_slurm_profile_dry_run_requests_gpus(workdir):
    res = snakemake("--profile", "profiles/slurm", "-n", "results/headline.md", cwd=workdir)
    assert res.returncode == 0, res.stderr + res.stdout
    # The default placement (dedicated, retriever.gpus 1): slime's 4 GPUs + the retriever's own, in the messages.
    assert "GRPO training (slime) on 5 GPUs, 1 node(s)" in res.stdout
    assert (
        "retriever: on 1 dedicated GPU(s) (placement dedicated: the job's GPU(s) 4; its own work sees only "
        "0,1,2,3)" in res.stdout
    )
    assert "env CUDA_VISIBLE_DEVICES=0,1,2,3 ray start --head" in res.stdout  # the Ray head gets slime's GPUs only
    evaluate = eval_messages(res.stdout)  # the message shows the job's real gpu resource
    assert len(evaluate) == 4 and all(" on 2 GPU(s)," in m for m in evaluate), evaluate
    where = "retriever: on 1 dedicated GPU(s) (placement dedicated: the job's GPU(s) 1; its own work sees only 0)"
    assert all(where in m for m in evaluate)
    check = next(b for b in res.stdout.split("rule ") if b.startswith("retriever_check:"))
    assert re.search(r"\bgpu=1\b", check)
    # On the CPU: no GPU for any retriever, the jobs ask for their own work's GPUs only.
    # (--config would pass nested numbers as strings: an extra config file is the way to override them.)
    (workdir / "cpu_retriever.yaml").write_text("retriever: {placement: cpu, gpus: 0}\n")
    res = snakemake(
        "--profile", "profiles/slurm", "-n", "results/headline.md", "--configfile", "config.yaml", "cpu_retriever.yaml",
        cwd=workdir,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr + res.stdout
    assert "GRPO training (slime) on 4 GPUs" in res.stdout and "retriever: on the CPU (placement cpu" in res.stdout
    evaluate = eval_messages(res.stdout)
    assert len(evaluate) == 4 and all(" on 1 GPU(s)," in m and "retriever: on the CPU" in m for m in evaluate)
    check = next(b for b in res.stdout.split("rule ") if b.startswith("retriever_check:"))
    assert re.search(r"\bgpu=0\b", check)
    # Two dedicated retriever GPUs are added to the jobs that start their own retriever.
    (workdir / "gpu_retriever.yaml").write_text("retriever: {placement: dedicated, gpus: 2}\n")
    res = snakemake(
        "--profile",
        "profiles/slurm",
        "-n",
        "results/headline.md",
        "--configfile",
        "config.yaml",
        "gpu_retriever.yaml",
        cwd=workdir,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert "GRPO training (slime) on 6 GPUs" in res.stdout
    evaluate = eval_messages(res.stdout)
    assert len(evaluate) == 4 and all(" on 3 GPU(s)," in m for m in evaluate)
    # Two nodes: GPUs per node as gres (SLURM may split a --gpus total unevenly over the nodes).
    (workdir / "two_nodes.yaml").write_text("train: {slime: {nodes: 2}}\n")
    res = snakemake(
        "--profile",
        "profiles/slurm",
        "-n",
        "-p",
        "results/headline.md",
        "--configfile",
        "config.yaml",
        "two_nodes.yaml",
        cwd=workdir,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert "GRPO training (slime) on 10 GPUs, 2 node(s)" in res.stdout and "srun --nodes=1" in res.stdout


@pytest.mark.parametrize("profile", [None, "profiles/toy"])
def test_lint_is_clean(workdir, profile):
    args = ["--lint"] + (["--profile", profile] if profile else [])
    res = snakemake(*args, cwd=workdir)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "Congratulations, your workflow is in a good condition!" in res.stdout + res.stderr


# The rule graph of config.yaml: rule -> the rules whose outputs it reads.
FULL_RULE_GRAPH = {
    "report": {"evaluate", "train"},
    "evaluate": {
        "container_image",
        "download_index",
        "corpus_offsets",
        "download_corpus",
        "export_rl",
        "fetch_encoder",
        "download_policy",
        "retriever_check",
        "prepare_data",
    },
    "corpus_offsets": {"download_corpus"},
    "download_index": {"fetch_encoder", "corpus_offsets", "download_corpus"},
    "prepare_data": {"download_qa"},
    "retriever_check": {"fetch_encoder", "download_index", "corpus_offsets", "download_corpus"},
    "export_rl": {"train"},
    "train": {
        "container_image",
        "download_index",
        "corpus_offsets",
        "download_corpus",
        "fetch_encoder",
        "download_policy",
        "retriever_check",
        "prepare_data",
    },
    "download_corpus": set(),
    "fetch_encoder": set(),
    "container_image": set(),
    "download_policy": set(),
    "download_qa": set(),
}


def rule_graph(mermaid: str) -> dict[str, set[str]]:
    """``{rule: {rules it depends on}}`` from Snakemake's mermaid-js rule graph."""
    names = dict(re.findall(r"^\s*(id\d+)\[(\w+)\]\s*$", mermaid, re.M))
    graph: dict[str, set[str]] = {name: set() for name in names.values()}
    for src, dst in re.findall(r"^\s*(id\d+) --> (id\d+)\s*$", mermaid, re.M):
        graph[names[dst]].add(names[src])
    return graph


def test_rulegraph_is_the_recipe_dag(workdir):
    res = snakemake("--rulegraph", "mermaid-js", "results/headline.md", cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert rule_graph(res.stdout) == FULL_RULE_GRAPH


@pytest.mark.parametrize(
    "override,message",
    [
        ({"train": {"n_sample_per_prompt": 8}}, "train.n_sample_per_prompt': unknown key"),
        ({"train": {"global_batch_size": 100}}, "train.global_batch_size"),
        ({"retriever": {"topk": 0}}, "retriever.topk"),
    ],
)
def test_bad_config_stops_the_workflow_naming_the_key(workdir, override, message):
    (workdir / "bad.yaml").write_text(yaml.safe_dump(override))
    res = snakemake("-n", "--configfile", "config.yaml", "bad.yaml", cwd=workdir)
    assert res.returncode != 0
    assert message in res.stderr + res.stdout


def test_snakefmt_clean():
    res = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules/"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr + res.stdout


def test_ruff_format_and_lint_clean():
    """The whole tree is ruff-formatted and lint-clean under pyproject's [tool.ruff] settings."""
    ruff = [sys.executable, "-m", "ruff"]
    fmt = subprocess.run([*ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run([*ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_every_rule_asks_for_the_resources_the_config_gives(workdir):
    """One place for a cluster user: resources.<step> (and train/eval.resources) reach every job's request."""
    (workdir / "res.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": {
                    name: {"mem_mb": 1000 + i, "runtime_min": 100 + i}
                    for i, name in enumerate(
                        ["download", "prepare_data", "corpus_offsets", "retriever_check", "export_rl", "report"]
                    )
                },
                "train": {"resources": {"mem_mb": 2001, "runtime_min": 201}},
                "eval": {"resources": {"mem_mb": 2002, "runtime_min": 202}},
            }
        )
    )
    res = snakemake("-n", "results/headline.md", "--configfile", "config.yaml", "res.yaml", cwd=workdir)
    assert res.returncode == 0, res.stderr + res.stdout
    expected = {
        "download_qa": (1000, 100),
        "download_policy": (1000, 100),
        "download_corpus": (1000, 100),
        "fetch_encoder": (1000, 100),
        "download_index": (1000, 100),
        "prepare_data": (1001, 101),
        "corpus_offsets": (1002, 102),
        "retriever_check": (1003, 103),
        "export_rl": (1004, 104),
        "report": (1005, 105),
    }
    assert "2001 MB, 201 min" in res.stdout  # the train and evaluate jobs print their request in their message
    messages = eval_messages(res.stdout)
    assert len(messages) == 4 and all("2002 MB, 202 min" in m for m in messages), messages
    blocks = {b.split(":", 1)[0]: b for b in res.stdout.split("rule ")[1:]}
    for rule, (mem, runtime) in expected.items():
        assert re.search(rf"\bmem_mb={mem}\b", blocks[rule]) and re.search(rf"\bruntime={runtime}\b", blocks[rule]), (
            rule,
            blocks[rule][-300:],
        )
