"""Results follow the config: on a finished toy run, changing one setting reruns exactly the steps whose
outputs depend on it (Snakemake's params trigger over the settings each rule declares), and nothing else.

Operational settings (schema: x-operational: ports, timeouts, batch sizes for throughput, resources) are
recorded but rerun nothing. Each case is a dry-run (`snakemake -n`) on the finished workdir.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import job_counts

pytestmark = pytest.mark.slow

TOY_CONFIGS = ("config.yaml", "config.toy.yaml")
RL_DOWNSTREAM = {"train": 1, "export_rl": 1, "evaluate": 2, "report": 1}  # training and what it feeds
# The toy evaluates 3 models (base, rl and eval.models' init, the policy before warm start) x 2 splits.
ALL_EVALS = {"evaluate": 6, "report": 1}
# the warm start feeds base and rl, not init
FROM_WARM_START = {"toy_warm_start": 1, "train": 1, "export_rl": 1, "evaluate": 4, "report": 1}
EVERYTHING_BUT_ENCODER = {
    "toy_world": 1,
    "prepare_data": 1,
    "corpus_offsets": 1,
    "build_index": 1,
    "toy_policy_init": 1,
    "toy_warm_start": 1,
    "retriever_check": 1,
    "train": 1,
    "export_rl": 1,
    "evaluate": 6,
    "report": 1,
}

CASES = {
    # train
    "train.lr": ({"train": {"lr": 5.0e-4}}, RL_DOWNSTREAM),
    "train.num_rollout": ({"train": {"num_rollout": 20}}, RL_DOWNSTREAM),
    "reward.structure_format_score (the training reward)": ({"reward": {"structure_format_score": 0.2}}, RL_DOWNSTREAM),
    "train.save_interval (operational)": ({"train": {"save_interval": 5}}, {}),
    "train.keep_checkpoints (operational)": ({"train": {"keep_checkpoints": 1}}, {}),
    "train.save_hf_interval (operational)": ({"train": {"save_hf_interval": 20}}, {}),
    "work_dir (operational)": ({"work_dir": "elsewhere/work"}, {}),
    "budget.margin (operational)": ({"budget": {"margin": 1.5}}, {}),
    "agent.skip_special_tokens (SGLang only: not read by the toy's HF engine)": (
        {"agent": {"skip_special_tokens": True}},
        {},
    ),
    "train.slime.* (not read by the torch backend)": ({"train": {"slime": {"tensor_model_parallel_size": 1}}}, {}),
    # eval
    "eval.max_questions": ({"eval": {"max_questions": 50}}, ALL_EVALS),
    # (the toy's learning curve evaluates during training at eval.temperature too)
    "eval.temperature": ({"eval": {"temperature": 0.5}}, {**RL_DOWNSTREAM, **ALL_EVALS}),
    "eval.interval (the learning curve's spacing)": ({"eval": {"interval": 30}}, RL_DOWNSTREAM),
    "eval.curve_subset": ({"eval": {"curve_subset": 40}}, RL_DOWNSTREAM),
    "eval.compare (the examples' pair)": ({"eval": {"compare": ["init", "rl"]}}, {"report": 1}),
    "eval.models (one more named model: evaluated alone)": (
        {
            "eval": {
                "models": {"init": {"path": "data/toy/models/policy_init"}, "rl_copy": {"path": "results/models/rl"}}
            }
        },
        {"evaluate": 2, "report": 1},
    ),
    "eval.batch_size (operational)": ({"eval": {"batch_size": 10}}, {}),
    # agent
    "agent.max_turns": ({"agent": {"max_turns": 3}}, {"train": 1, "export_rl": 1, "evaluate": 6, "report": 1}),
    "agent.search_concurrency (operational)": ({"agent": {"search_concurrency": 8}}, {}),
    # retriever
    "retriever.topk": ({"retriever": {"topk": 4}}, {**FROM_WARM_START, "evaluate": 6, "retriever_check": 1}),
    "retriever.encoder.max_length": (
        {"retriever": {"encoder": {"max_length": 64}}},
        {**FROM_WARM_START, "evaluate": 6, "build_index": 1, "retriever_check": 1},
    ),
    "retriever.encoder.cpu_bf16": (
        {"retriever": {"encoder": {"cpu_bf16": False}}},
        {**FROM_WARM_START, "evaluate": 6, "build_index": 1, "retriever_check": 1},
    ),
    "retriever.port (operational)": ({"retriever": {"port": 9999}}, {}),
    "retriever.index.build_shard_size (operational)": ({"retriever": {"index": {"build_shard_size": 500}}}, {}),
    # data
    "data.splits.nq_test.expected_rows": (
        {"data": {"splits": {"nq_test": {"data_source": "nq", "expected_rows": 201}}}},
        {"prepare_data": 1, "train": 1, "export_rl": 1, "evaluate": 6, "report": 1},
    ),
    "toy.n_couples": ({"toy": {"n_couples": 2000}}, EVERYTHING_BUT_ENCODER),
    "seed": ({"seed": 7}, EVERYTHING_BUT_ENCODER),
    "toy.warm_start.steps": ({"toy": {"warm_start": {"steps": 10}}}, FROM_WARM_START),
    "toy.warm_start.passage_loss_weight": ({"toy": {"warm_start": {"passage_loss_weight": 0.5}}}, FROM_WARM_START),
    "toy.warm_start.attn_implementation": ({"toy": {"warm_start": {"attn_implementation": "sdpa"}}}, FROM_WARM_START),
    # report
    "published.rl.nq_test": ({"published": {"rl": {"nq_test": 0.5}}}, {"report": 1}),
    "resources.report.mem_mb (operational)": ({"resources": {"report": {"mem_mb": 3000}}}, {}),
}


def dry_run(wf: Path, change: dict | None, *extra: str) -> subprocess.CompletedProcess:
    args = ["results/headline.md"]
    if change is not None:
        (wf / "change.yaml").write_text(yaml.safe_dump(change))
        args += ["--configfile", *TOY_CONFIGS, "change.yaml"]
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/toy", "-n", *extra, *args]
    return subprocess.run(cmd, cwd=wf, capture_output=True, text=True, timeout=300)


def test_a_finished_run_has_nothing_to_do(toy_run):
    res = dry_run(toy_run, None)
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout + res.stderr) == {}


@pytest.mark.parametrize("name", list(CASES))
def test_a_changed_setting_reruns_exactly_what_depends_on_it(toy_run, name):
    change, expected = CASES[name]
    res = dry_run(toy_run, change)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert job_counts(out) == expected, f"{name}: {job_counts(out)} != {expected}"
    if expected:
        # -n says why: the first step that reads the key has changed params, naming the key and both values.
        # (a key inside a map such as published.rl.nq_test is reported as the declared map, 'published')
        parts = name.split(" ")[0].split(".")
        keys = [".".join(parts[: i + 1]) for i in range(len(parts))]
        assert "Params have changed since last execution" in out, out[-3000:]
        assert any(f"'{key}'" in out for key in keys), (keys, out[-3000:])


def test_summary_names_the_outputs_whose_settings_changed(toy_run):
    """`snakemake --summary` marks exactly the outputs of the steps that read the changed key "params changed".

    (`--list-changes params` of Snakemake 9.27 lists every output with a params record, changed or not:
    ParamsChange keeps the file of an unchanged comparison and the listing iterates it without its truth
    value; --summary tests the truth value.)
    """
    (toy_run / "change.yaml").write_text(yaml.safe_dump({"train": {"lr": 5.0e-4}}))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "profiles/toy",
        "--summary",
        "--configfile",
        *TOY_CONFIGS,
        "change.yaml",
    ]
    res = subprocess.run(cmd, cwd=toy_run, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("\t") for line in res.stdout.splitlines() if "\t" in line]
    header = rows[0]
    status = {row[0]: row[header.index("status")] for row in rows[1:]}
    changed = {path for path, state in status.items() if state == "params changed"}
    assert changed == {"results/train/metrics.jsonl", "results/train/final.json", "results/train/eval_curve.jsonl"}
    assert status["results/eval/base/nq_test.json"] == "ok"
