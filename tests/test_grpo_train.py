"""End-to-end runs of the local GRPO trainer on a tiny policy (conftest's grpo_world): learning step, kill and
resume."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import FakeRetriever, grpo_settings
from safetensors.torch import load_file

from searchr1.grpo import GRPOSettings, train_grpo
from searchr1.grpo.checkpoint import list_checkpoints

TIMING_KEYS = {"wall_time_s", "rollout_time_s"}
# SEARCHR1_TEST_DEVICE=cuda runs the same tests on a GPU (the backend must work on one GPU too).
DEVICE = os.environ.get("SEARCHR1_TEST_DEVICE", "cpu")


def scripted_retriever() -> FakeRetriever:
    """Hits that depend only on the query text (the real retriever's ranking is not what this test checks)."""
    return FakeRetriever(
        lambda q: [{"id": str(k), "contents": f'"{q or "x"}"\n{q} paris baker dee rome'} for k in range(8)]
    )


def settings(**kw):
    base = dict(
        seed=3,
        num_rollout=5,
        rollout_batch_size=2,
        n_samples_per_prompt=4,
        global_batch_size=4,
        rollout_max_response_len=8,
        max_turns=2,
        topk=2,
        lr=5e-3,
        checkpoint_interval=2,
        micro_batch_size=3,
        bf16_autocast=False,
        device=DEVICE,
        use_tis=True,
        eval_interval=1,
    )
    base.update(kw)
    return grpo_settings(**base)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def run(world, out: Path, s: GRPOSettings, hook=None):
    policy, parquet = world
    return train_grpo(
        policy_dir=policy,
        train_parquet=parquet,
        work_dir=out / "work",
        metrics_path=out / "metrics.jsonl",
        export_dir=out / "export",
        retriever_url=None,
        settings=s,
        eval_hook=hook,
        retriever=scripted_retriever(),
    )


class Killed(RuntimeError):
    pass


def test_killed_run_resumes_to_identical_metrics_and_weights(grpo_world, tmp_path):
    s = settings()
    full = run(grpo_world, tmp_path / "full", s)
    assert full["resumed_from"] is None
    ref = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in ref] == list(range(5))
    for key in (
        "reward_mean",
        "response_len_mean",
        "searches_mean",
        "em_mean",
        "wall_time_s",
        "kl",
        "pg_loss",
        "clipfrac",
        "entropy",
        "grad_norm",
        "search_rate",
        "retrieval_failures",
        "tis",
    ):
        assert all(key in r for r in ref), key
    assert all(math.isfinite(r["pg_loss"]) and math.isfinite(r["grad_norm"]) for r in ref)
    assert any(r["searches_mean"] > 0 for r in ref)  # the retriever path ran
    # A learning signal: some steps hold a group whose rewards differ (nonzero advantages), and exactly those
    # steps carry a policy gradient; a step whose groups all have equal rewards has pg_loss 0 and only the
    # KL term's tiny gradient (the policy is still next to the reference).
    groups = s.rollout_batch_size
    assert all(r["zero_std_group_frac"] * groups == round(r["zero_std_group_frac"] * groups) for r in ref)
    signal = [r for r in ref if r["zero_std_group_frac"] < 1]
    assert signal and len(signal) < len(ref), [r["zero_std_group_frac"] for r in ref]
    for r in ref:
        if r["zero_std_group_frac"] < 1:
            assert r["reward_mean"] > 0 and r["grad_norm"] > 0.1, r
        else:
            assert r["pg_loss"] == 0.0 and 0 < r["grad_norm"] < 0.01, r

    def kill_at_step_2(step, model, tokenizer):  # after metrics line 2, past the checkpoint of 2 steps
        if step == 2:
            raise Killed()

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(grpo_world, out, s, hook=kill_at_step_2)
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    assert [n for n, _ in list_checkpoints(out / "work")] == [2]
    resumed = run(grpo_world, out, s)
    assert resumed["resumed_from"] == 2
    got = read_metrics(out / "metrics.jsonl")
    assert without_timing(got) == without_timing(ref)
    assert [n for n, _ in list_checkpoints(out / "work")] == [4, 5]  # keep last 2
    w_full = load_file(tmp_path / "full" / "export" / "model.safetensors")
    w_res = load_file(out / "export" / "model.safetensors")
    assert w_full.keys() == w_res.keys()
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    # the policy moved away from the base
    w_base = load_file(grpo_world[0] / "model.safetensors")
    assert any(not torch.equal(w_base[k], w_full[k]) for k in w_base)
    assert (tmp_path / "full" / "export" / "tokenizer.json").is_file()
    # rerun of a finished run: nothing to train, same metrics, export rewritten
    again = run(grpo_world, out, s)
    assert again["resumed_from"] == 5
    assert without_timing(read_metrics(out / "metrics.jsonl")) == without_timing(ref)


def test_single_optimizer_step_is_on_policy_and_eval_hook_runs(grpo_world, tmp_path):
    calls = []
    s = settings(num_rollout=2, global_batch_size=8, checkpoint_interval=5, eval_interval=1, use_tis=False)
    run(grpo_world, tmp_path, s, hook=lambda step, model, tok: calls.append(step))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert calls == [0, 1]
    for r in recs:  # one optimizer step per rollout: ratio is exactly 1 (old logprobs = current, detached)
        assert r["clipfrac"] == 0.0 and r["ppo_kl"] == 0.0
        assert "tis" not in r
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert [n for n, _ in list_checkpoints(tmp_path / "work")] == [2]  # the last step is always saved
