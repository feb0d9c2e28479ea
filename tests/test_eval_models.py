"""Issue 15: named models (eval.models) from the local hub server and from a local directory, and the
learning-curve points through a kill and a resume."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, copy_workflow, run_job_in_fresh_process, snakemake
from hubserver import HubServer

MODEL_REPO = "PeterJinGo/SearchR1-nq_hotpotqa_train-qwen2.5-7b-em-ppo"
MODEL_FILES = {
    "config.json": b'{"model_type": "qwen2"}',
    "model.safetensors": b"weights" * 100,
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "README.md": b"not a model file",
}


def _download_step(hub: HubServer, tmp_path: Path, revision: str = "main") -> subprocess.CompletedProcess:
    """The rule download_model_<name>'s job, under exactly the params Snakemake gives it, in a fresh process."""
    (tmp_path / "extra.yaml").write_text(
        f"data_dir: {tmp_path / 'data'}\neval:\n  models:\n    ppo7b: {{repo: {MODEL_REPO}, revision: {revision}}}\n"
    )
    out = str(tmp_path / "data/models/eval/ppo7b")
    return run_job_in_fresh_process(
        "download_model_ppo7b",
        "data.download_model",
        ("config.yaml", str(tmp_path / "extra.yaml")),
        hub.client_env(),
        outputs={"_list": [out]},
    )


def test_named_model_from_the_hub_is_downloaded_verified_and_locked(tmp_path):
    with HubServer() as hub:
        repo = hub.state.add("model", MODEL_REPO, MODEL_FILES)
        res = _download_step(hub, tmp_path)
        assert res.returncode == 0, res.stderr
        out = tmp_path / "data/models/eval/ppo7b"
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (out / name).read_bytes() == MODEL_FILES[name]
        assert not (out / "README.md").exists()  # model files only
        lock = json.loads((tmp_path / "data/download-lock.json").read_text())
        entry = lock[f"model:{MODEL_REPO}/model.safetensors"]
        assert entry["commit"] == repo.commit and entry["revision"] == "main"
        record = json.loads((out / "searchr1_provenance.json").read_text())
        assert record["provenance"]["settings"]["eval.models"] == {"ppo7b": {"repo": MODEL_REPO, "revision": "main"}}
        # the hub moved on: a re-download fails loudly instead of mixing two versions of the weights
        repo.commit = "f" * 40
        (out / "model.safetensors").write_bytes(b"changed")
        res = _download_step(hub, tmp_path)
        assert res.returncode != 0 and "now resolves to commit" in res.stderr


def test_named_model_without_weights_is_an_error(tmp_path):
    with HubServer() as hub:
        hub.state.add("model", MODEL_REPO, {"config.json": b"{}"})
        res = _download_step(hub, tmp_path)
        assert res.returncode != 0 and "no *.safetensors weights" in res.stderr


def test_named_model_from_a_local_directory_is_evaluated_from_it(tmp_path):
    """A local checkpoint directory is the evaluate job's model input as it is; nothing downloads or trains."""
    wf = copy_workflow(tmp_path / "wf")
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "config.json").write_text("{}")
    (wf / "extra.yaml").write_text(f"eval:\n  models:\n    mine: {{path: {local}}}\n")
    res = snakemake("-n", "--configfile", "config.yaml", "extra.yaml", "--", "results/eval/mine/nq_test.json", cwd=wf)
    assert res.returncode == 0, res.stderr + res.stdout
    # the job's message names the model, its directory and the split (rules/common.smk EVAL_MESSAGE)
    job = res.stdout.split("evaluate mine (", 1)[1].split("\n", 1)[0]
    assert job.startswith(f"{local}) on nq_test")
    assert "rule train:" not in res.stdout and "rule download_policy:" not in res.stdout


@pytest.mark.parametrize(
    "models,compare,message",
    [
        ({"rl": {"path": "x"}}, ["base", "rl"], "'rl' is reserved"),
        ({}, ["base", "nope"], "model 'nope' is not one of base, rl"),
        ({}, ["rl", "rl"], "needs two different models"),
        ({"a": {"repo": "o/n"}}, ["base", "rl"], "eval.models"),  # a repo needs its revision
    ],
)
def test_model_settings_are_checked(models, compare, message):
    from searchr1.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "config.yaml", overrides={"eval": {"models": models, "compare": compare}})


# --- the learning curve through a kill and a resume ------------------------------------------------------


class Killed(RuntimeError):
    pass


def test_learning_curve_points_survive_a_kill_without_duplicates_or_gaps(grpo_world, tmp_path):
    """Points are written per (step, split) as the hook evaluates them; a kill in the middle of a point (one
    split written, the other not, no checkpoint yet) resumes from the last checkpoint, and the steps evaluated
    again replace their points: every point exactly once."""
    from test_grpo_train import run, settings

    from searchr1.evaluate import append_curve_point as record_curve_point
    from searchr1.stats import read_jsonl

    curve = tmp_path / "out" / "work" / "eval_curve.jsonl"
    s = settings(num_rollout=6, checkpoint_interval=4, eval_interval=2)
    summary = {"em": 0.5, "n": 4, "ci95": {"low": 0.1, "high": 0.9}, "searched_at_least_once": 1.0}
    kill = {"at": 3}

    def hook(step, model, tokenizer, *, before_training):
        record_curve_point(curve, step=step, split="nq_test", summary=summary, before_training=before_training)
        if step == kill["at"]:
            raise Killed()  # after nq_test's point of this step, before hotpotqa_test's and the checkpoint
        record_curve_point(curve, step=step, split="hotpotqa_test", summary=summary, before_training=before_training)

    with pytest.raises(Killed):
        run(grpo_world, tmp_path / "out", s, hook=hook)
    assert [(p["step"], p["split"], p["before_training"]) for p in read_jsonl(curve)] == [
        (0, "nq_test", True),  # the starting policy, before the first update (slime's rollout-0 evaluation)
        (0, "hotpotqa_test", True),
        (1, "nq_test", False),
        (1, "hotpotqa_test", False),
        (3, "nq_test", False),
    ]
    kill["at"] = None
    resumed = run(grpo_world, tmp_path / "out", s, hook=hook)
    assert resumed["resumed_from"] is None  # no checkpoint before the kill: steps 0, 1 and 3 evaluated again
    points = [(p["step"], p["split"]) for p in read_jsonl(curve)]
    assert sorted(points) == sorted((step, split) for step in (0, 1, 3, 5) for split in ("nq_test", "hotpotqa_test"))
    assert len(points) == len(set(points)) == 8


def test_report_step_passes_published_numbers_of_every_model(tmp_path, monkeypatch):
    """The report job under its declared params: a named model with and without published numbers (a lookup of
    an absent one must be an ordinary miss, not an undeclared setting)."""
    from helpers import rule_params

    import searchr1.report
    from searchr1.report import headline_table
    from searchr1.steps import resolve
    from searchr1.steps.settings import StepSettings

    (tmp_path / "extra.yaml").write_text(
        "eval:\n  models:\n    ppo7b: {path: /x}\n    other: {path: /y}\n  compare: [ppo7b, rl]\n"
        "published:\n  ppo7b: {nq_test: 0.5}\n"
    )
    params = rule_params("report", "config.yaml", str(tmp_path / "extra.yaml"))
    seen = {}
    monkeypatch.setattr(searchr1.report, "render_report", lambda **kw: seen.update(kw))
    outputs = {
        "headline": "h.md",
        "examples": "x.md",
        "reward": str(tmp_path / "plots/reward.png"),
        "provenance": "p.json",
    }
    resolve("report.report")(
        StepSettings.from_params(params, step="report"),
        inputs={"evals": [str(tmp_path / "eval/base/nq_test.json")], "metrics": "m.jsonl", "final": "f.json"},
        outputs=outputs,
    )
    assert seen["models"] == ["base", "rl", "ppo7b", "other"] and seen["compare"] == ["ppo7b", "rl"]
    assert seen["published"]["ppo7b"] == {"nq_test": 0.5} and "other" not in seen["published"]
    summary = {"em": 0.5, "ci95": {"low": 0.1, "high": 0.9}}
    lines = headline_table(
        {(m, "nq_test"): summary for m in seen["models"]}, seen["published"], ["nq_test"], True, seen["models"]
    )
    assert any(line.startswith("| ppo7b | 0.500 [0.100, 0.900] | 0.500 | +0.000 |") for line in lines)
    assert any(line.startswith("| other | 0.500 [0.100, 0.900] | — | — |") for line in lines)
