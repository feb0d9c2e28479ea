"""Experiments x seeds (searchr1.experiments, rules/common.smk): the runs, their validation, each run's own
declared settings (so a changed experiment setting, a new seed or a new experiment schedules exactly the
dependent jobs), the full-scale commands and budget of several runs.

The rerun checks are dry-runs on a "finished" toy workflow made by `snakemake --touch` over empty outputs
(seconds, no training): Snakemake's params trigger compares the settings each job declared when touched with
those it declares now, exactly as on a run that computed them.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import config as make_config
from helpers import copy_workflow, entrypoint_argv, job_counts, snakemake

from searchr1.budget import format_plan, jobs
from searchr1.config import ConfigError, run_config, validate_config, validate_experiments
from searchr1.experiments import Run, runs, train_seeds

TOY_CONFIGS = ("config.yaml", "config.toy.yaml")
TWO_BY_TWO = {"experiments": {"recipe": {}, "lr_high": {"train": {"lr": 2.0e-4}}}, "train": {"seeds": [1, 2]}}


# --- the runs and their configs -------------------------------------------------------------------------


def test_default_is_the_single_run_with_its_usual_paths():
    cfg = make_config(toy=True)
    assert cfg["experiments"] == {"recipe": {}} and cfg["train"]["seeds"] is None
    assert train_seeds(cfg) == [cfg["seed"]] and cfg["train"]["seed"] == cfg["seed"]
    (run,) = runs(cfg)
    assert (run.model, run.train_dir, run.model_dir) == ("rl", "results/train", "results/models/rl")
    assert run_config(cfg, run) == cfg  # the single run's effective config is the config


def test_several_runs_have_their_own_paths_seed_and_work_dir():
    cfg = make_config(toy=True, **TWO_BY_TWO)
    got = runs(cfg)
    assert [(r.experiment, r.seed) for r in got] == [("recipe", 1), ("recipe", 2), ("lr_high", 1), ("lr_high", 2)]
    run = got[3]
    assert run.model == "rl-lr_high-s2"
    assert run.train_dir == "results/runs/lr_high/seed2/train" and run.model_dir == "results/runs/lr_high/seed2/model"
    eff = run_config(cfg, run)
    assert eff["train"]["seed"] == 2 and eff["train"]["lr"] == 2.0e-4 and eff["seed"] == cfg["seed"]
    assert eff["work_dir"] == f"{cfg['work_dir']}/runs/lr_high/seed2"
    assert run_config(cfg, got[0])["train"]["lr"] == cfg["train"]["lr"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"lrr": 1.0}}, "experiments.bad.train.lrr': unknown key"),
        ({"eval": {"temperature": 0.5}}, "experiments.bad.eval.temperature': an experiment may change only"),
        ({"seed": 3}, "experiments.bad.seed': an experiment may change only"),
        ({"train": {"backend": "slime"}}, "experiments.bad.train.backend': the same for every run"),
        ({"train": {"seeds": [1]}}, "experiments.bad.train.seeds': the same for every run"),
        ({"agent": {"max_turns": {"x": 1}}}, "experiments.bad.agent.max_turns.x': unknown key"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(toy=True, experiments={"recipe": {}, "bad": overrides})


def test_each_merged_experiment_config_is_validated():
    cfg = make_config(toy=True, experiments={"recipe": {}, "neg": {"train": {"lr": -1.0}}})
    with pytest.raises(ConfigError, match=r"(?s)experiment .neg. \(seed \d+\).*train.lr"):
        validate_experiments(cfg)
    # a relation between keys, broken by the merge alone
    cfg = make_config(toy=True, experiments={"recipe": {}, "odd": {"train": {"global_batch_size": 48}}})
    with pytest.raises(ConfigError, match="(?s)experiment .odd.*global_batch_size"):
        validate_experiments(cfg)


def test_seeds_and_names_are_checked():
    with pytest.raises(ConfigError, match="train.seeds"):
        make_config(toy=True, train={"seeds": [1, 1]})
    with pytest.raises(ConfigError, match="train.seed': 5 is set per run"):
        make_config(toy=True, train={"seeds": [1, 2], "seed": 5})
    with pytest.raises(ConfigError, match="experiments"):
        make_config(toy=True, experiments={"with-dash": {}})
    with pytest.raises(ConfigError, match="'rl-a-s1' is reserved"):
        make_config(toy=True, eval={"models": {"rl-a-s1": {"path": "x"}}})


def test_a_run_model_name_is_parsed_back():
    cfg = make_config(toy=True, **TWO_BY_TWO)
    assert {r.model: r for r in runs(cfg)}["rl-recipe-s2"] == Run("recipe", 2, False)


def test_budget_counts_every_run():
    one = make_config()
    six = make_config(experiments={"recipe": {}, "fmt": {"train": {"lr": 2e-6}}}, train={"seeds": [1, 2, 3]})
    train_one = next(j for j in jobs(one) if j.rule == "train")
    train_six = next(j for j in jobs(six) if j.rule == "train")
    assert (train_one.count, train_six.count) == (1, 6)
    evals = {
        cfg_name: next(j for j in jobs(cfg) if j.rule == "evaluate").count
        for cfg_name, cfg in (("one", one), ("six", six))
    }
    assert evals == {"one": 2 * 2, "six": (1 + 6) * 2}  # base + RL models, x 2 splits
    plan = format_plan(six)
    assert "per run x 6 runs" in plan and "runs: 6 = 2 experiment(s)" in plan
    gpu_hours = re.search(r"GPU-hours requested: ([\d,]+) in all, ([\d,]+) of them training", plan)
    gpus = six["train"]["slime"]["nodes"] * six["train"]["slime"]["gpus_per_node"] + six["retriever"]["gpus"]
    assert int(gpu_hours.group(2).replace(",", "")) == round(6 * gpus * six["train"]["resources"]["runtime_min"] / 60)
    one_plan = format_plan(one)
    assert "runs:" not in one_plan and "(1 run;" in one_plan


# --- the DAG ------------------------------------------------------------------------------------------


def _dry_run(wf: Path, *configs: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/toy", "-n", "results/headline.md"]
    if configs:
        cmd += ["--configfile", *configs]
    return subprocess.run(cmd, cwd=wf, capture_output=True, text=True, timeout=300)


def _finish_by_touch(wf: Path, *configs: str) -> None:
    """Every output of the DAG as an empty file (a directory for directory outputs), recorded as made under
    the current settings (`snakemake --touch --forceall` records every job's params)."""
    extra = ["--configfile", *configs] if configs else []
    base = [sys.executable, "-m", "snakemake", "--profile", "profiles/toy"]
    summary = subprocess.run(
        [*base, "--summary", "results/headline.md", *extra], cwd=wf, capture_output=True, text=True, timeout=300
    )
    assert summary.returncode == 0, summary.stderr[-3000:]
    for line in summary.stdout.splitlines()[1:]:
        path = wf / line.split("\t")[0]
        if "." in path.name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        [*base, "--touch", "--forceall", "results/headline.md", *extra],
        cwd=wf,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    done = _dry_run(wf, *configs)
    assert job_counts(done.stdout + done.stderr) == {}, done.stdout[-3000:]


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory) -> Path:
    wf = copy_workflow(tmp_path_factory.mktemp("experiments") / "wf")
    (wf / "runs.yaml").write_text(yaml.safe_dump(TWO_BY_TWO))
    _finish_by_touch(wf, *TOY_CONFIGS, "runs.yaml")
    return wf


def _with(wf: Path, change: dict) -> dict[str, int]:
    (wf / "change.yaml").write_text(yaml.safe_dump(change))
    res = _dry_run(wf, *TOY_CONFIGS, "runs.yaml", "change.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    return job_counts(res.stdout + res.stderr)


ONE_EXPERIMENT = {"train": 2, "export_rl": 2, "evaluate": 4, "report": 1}  # its 2 seeds x (train, 2 splits)
CASES = {
    "one experiment's setting": (
        {"experiments": {"recipe": {}, "lr_high": {"train": {"lr": 3.0e-4}}}},
        ONE_EXPERIMENT,
    ),
    "one experiment's agent setting (its training and evaluations)": (
        {"experiments": {"recipe": {}, "lr_high": {"train": {"lr": 2.0e-4}, "agent": {"max_turns": 3}}}},
        ONE_EXPERIMENT,
    ),
    "a seed added (only the new seed's runs)": ({"train": {"seeds": [1, 2, 3]}}, ONE_EXPERIMENT),
    "a seed removed (nothing to train; the report)": ({"train": {"seeds": [1]}}, {"report": 1}),
    "an experiment added (only its runs)": (
        {"experiments": {"recipe": {}, "lr_high": {"train": {"lr": 2.0e-4}}, "turns": {"agent": {"max_turns": 3}}}},
        ONE_EXPERIMENT,
    ),
    "a shared setting one experiment overrides (only the other's runs)": ({"train": {"lr": 5.0e-5}}, ONE_EXPERIMENT),
    "a shared setting no experiment overrides (every run)": (
        {"train": {"num_rollout": 10}},
        {"train": 4, "export_rl": 4, "evaluate": 8, "report": 1},
    ),
    "an operational setting (nothing)": ({"train": {"save_interval": 5}}, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_change_schedules_exactly_the_dependent_jobs(two_by_two, name):
    change, expected = CASES[name]
    assert _with(two_by_two, change) == expected


def test_the_default_single_run_keeps_its_paths(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    res = _dry_run(wf)
    assert res.returncode == 0, res.stderr[-3000:]
    for path in ("results/train/metrics.jsonl", "results/models/rl", "results/eval/rl/nq_test.json"):
        assert path in res.stdout
    assert "results/runs" not in res.stdout and job_counts(res.stdout)["train"] == 1


# --- full scale -------------------------------------------------------------------------------------------


def _train_commands(out: str) -> dict[tuple[str, str], list[str]]:
    """{(experiment, seed): the slime train.py command's words (inside ray job submit's sh -c)} from the
    train jobs' messages of `-n`."""
    commands = {}
    for block in out.split("GRPO training (slime)")[1:]:
        line = next(ln for ln in block.splitlines() if "/root/slime/train.py" in ln)
        m = re.search(r"runs/(\w+)/seed(\d+)/", line)
        # the run's own directories (checkpoints, custom config, container binds) are named after the run
        submit = shlex.split(re.sub(r"runs/\w+/seed\d+\b", "runs/<run>", line))
        commands[(m.group(1), m.group(2))] = entrypoint_argv(submit)  # slime's train.py words
    return commands


def test_full_scale_two_experiments_by_three_seeds(tmp_path):
    (tmp_path / "runs.yaml").write_text(
        yaml.safe_dump(
            {"experiments": {"recipe": {}, "lr_high": {"train": {"lr": 2.0e-6}}}, "train": {"seeds": [1, 2, 3]}}
        )
    )
    proc = snakemake("-n", "results/headline.md", "--configfile", "config.yaml", str(tmp_path / "runs.yaml"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert job_counts(out)["train"] == 6
    assert "train x6" in out and "runs: 6 = 2 experiment(s)" in out  # the budget printed before the DAG
    commands = _train_commands(out)
    assert sorted(commands) == [(e, s) for e in ("lr_high", "recipe") for s in ("1", "2", "3")]
    ref = commands[("recipe", "1")]
    for (experiment, seed), words in commands.items():
        assert len(words) == len(ref)
        differ = {words[i - 1]: (ref[i], words[i]) for i in range(1, len(ref)) if words[i] != ref[i]}
        expected = {} if seed == "1" else {"--seed": ("1", seed), "--rollout-seed": ("1", seed)}
        if experiment == "lr_high":
            expected["--lr"] = ("1e-06", "2e-06")
        assert differ == expected, (experiment, seed, differ)


def test_the_smoke_config_runs_an_experiment_pair(tmp_path):
    (tmp_path / "pair.yaml").write_text(
        yaml.safe_dump({"experiments": {"recipe": {}, "turns3": {"agent": {"max_turns": 3}}}})
    )
    proc = snakemake(
        "-n", "results/headline.md", "--configfile", "config.yaml", "config.smoke.yaml", str(tmp_path / "pair.yaml")
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    counts = job_counts(out)
    assert counts["train"] == 2 and counts["evaluate"] == 3 * 2 and counts["export_rl"] == 2
    assert "GRPO training (slime) on 1 GPUs" in out
    assert "results/eval/rl-turns3-s42/nq_test.json" in out


def test_validate_config_accepts_a_resolved_config():
    """The effective configs are re-validated after resolution (train.seed set, work_dir resolved)."""
    cfg = make_config(toy=True, **TWO_BY_TWO)
    assert validate_config(cfg) == cfg
