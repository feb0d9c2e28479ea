"""End-to-end runs of the local GRPO trainer on a tiny policy (conftest's grpo_world): learning step, kill and
resume."""

import dataclasses
import json
import math
import os
import shutil
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

    def kill_at_step_2(step, model, tokenizer, *, before_training):  # after metrics line 2, past checkpoint 2
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
    run(grpo_world, tmp_path, s, hook=lambda step, model, tok, before_training: calls.append((step, before_training)))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    # slime's schedule: the starting policy at rollout 0 before the first update, then after every rollout
    assert calls == [(0, True), (0, False), (1, False)]
    for r in recs:  # one optimizer step per rollout: ratio is exactly 1 (old logprobs = current, detached)
        assert r["clipfrac"] == 0.0 and r["ppo_kl"] == 0.0
        assert "tis" not in r
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert [n for n, _ in list_checkpoints(tmp_path / "work")] == [2]  # the last step is always saved


def test_curve_point_before_training_only_when_starting_from_step_0(grpo_world, tmp_path):
    """As slime's train.py (only when the start rollout id is 0): a resumed run adds no point before training."""
    calls = []

    def hook(step, model, tokenizer, *, before_training):
        calls.append((step, before_training))

    s = settings(num_rollout=2, checkpoint_interval=1, eval_interval=2)
    run(grpo_world, tmp_path, dataclasses.replace(s, num_rollout=1), hook=hook)
    assert calls == [(0, True)]  # interval 2: no point after rollout 0
    calls.clear()
    assert run(grpo_world, tmp_path, s, hook=hook)["resumed_from"] == 1
    assert calls == [(1, False)]


def test_format_aware_reward_trains_on_the_shaped_score_and_logs_em_beside_it(grpo_world, tmp_path, monkeypatch):
    """reward.* non-zero: every rollout is scored with Search-R1's compute_score_em (reward_mean, the GRPO groups),
    and its exact match is logged beside it (em_mean)."""
    from searchr1.reward import RewardSettings, compute_score_em, em_score, is_valid_sequence

    scored = []
    real_score = RewardSettings.score

    def spy(self, text, golden):
        value = real_score(self, text, golden)
        scored.append((text, list(golden), value))
        return value

    monkeypatch.setattr(RewardSettings, "score", spy)
    s = settings(num_rollout=2, structure_format_score=0.2, final_format_score=0.1, retrieval_score=0.05)
    run(grpo_world, tmp_path, s)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    n = s.rollout_batch_size * s.n_samples_per_prompt
    assert len(scored) == 2 * n
    for step, rec in enumerate(recs):
        batch = scored[step * n : (step + 1) * n]
        for text, golden, value in batch:
            expected = compute_score_em(
                text, {"target": golden}, structure_format_score=0.2, final_format_score=0.1, retrieval_score=0.05
            )
            assert value == expected
        assert rec["reward_mean"] == pytest.approx(sum(v for _, _, v in batch) / n)
        assert rec["em_mean"] == pytest.approx(sum(em_score(t, g) for t, g, _ in batch) / n)
        assert rec["format_valid_rate"] == pytest.approx(sum(is_valid_sequence(t)[0] for t, _, _ in batch) / n)
    # the shaped reward differs from EM on these rollouts (format and final scores are paid)
    assert any(r["reward_mean"] != r["em_mean"] for r in recs)


def test_format_aware_reward_behind_a_prompt_without_the_assistant_marker_is_refused(grpo_world, tmp_path):
    from transformers import AutoTokenizer

    from searchr1.reward import RewardConfigError

    policy, parquet = grpo_world
    plain = tmp_path / "plain_policy"
    shutil.copytree(policy, plain)
    tok = AutoTokenizer.from_pretrained(plain)
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    tok.save_pretrained(plain)
    s = settings(num_rollout=1, final_format_score=0.1)
    with pytest.raises(RewardConfigError, match="no '<\\|im_start\\|>assistant' marker"):
        run((plain, parquet), tmp_path / "out", s)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    run((plain, parquet), tmp_path / "em", dataclasses.replace(s, final_format_score=0.0))  # exact match: trains
