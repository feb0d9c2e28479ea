"""The torch backend's settings: every recipe key reaches its GRPOSettings field (and the objective's), and
the learning-rate schedules give the hand-computed values."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from helpers import config, grpo_settings

from searchr1.grpo.objective import ObjectiveSettings
from searchr1.grpo.settings import GRPOSettings
from searchr1.grpo.trainer import lr_at

# config key -> (GRPOSettings field, a valid value other than the toy config's), written out by hand.
RECIPE = {
    "seed": ("seed", 7),
    "train.num_rollout": ("num_rollout", 11),
    "train.rollout_batch_size": ("rollout_batch_size", 16),
    "train.n_samples_per_prompt": ("n_samples_per_prompt", 16),
    "train.global_batch_size": ("global_batch_size", 32),
    "train.rollout_max_response_len": ("rollout_max_response_len", 33),
    "train.rollout_temperature": ("rollout_temperature", 0.7),
    "train.rollout_top_p": ("rollout_top_p", 0.9),
    "train.rollout_shuffle": ("rollout_shuffle", False),
    "train.eps_clip": ("eps_clip", 0.1),
    "train.eps_clip_high": ("eps_clip_high", 0.3),
    "train.use_kl_loss": ("use_kl_loss", False),
    "train.kl_loss_type": ("kl_loss_type", "k1"),
    "train.kl_loss_coef": ("kl_loss_coef", 0.02),
    "train.entropy_coef": ("entropy_coef", 0.001),
    "train.use_tis": ("use_tis", False),
    "train.lr": ("lr", 3.0e-4),
    "train.lr_decay_style": ("lr_decay_style", "cosine"),
    "train.weight_decay": ("weight_decay", 0.05),
    "train.adam_beta1": ("adam_beta1", 0.8),
    "train.adam_beta2": ("adam_beta2", 0.95),
    "train.save_interval": ("checkpoint_interval", 3),
    "train.keep_checkpoints": ("keep_checkpoints", 5),
    "train.save_hf_interval": ("save_hf_interval", 30),
    "train.torch.adam_eps": ("adam_eps", 1.0e-6),
    "train.torch.grad_clip": ("grad_clip", 0.5),
    "train.torch.device": ("device", "cuda"),
    "train.torch.micro_batch_size": ("micro_batch_size", 4),
    "train.torch.bf16_autocast": ("bf16_autocast", False),
    "train.torch.generation_batch_size": ("generation_batch_size", 5),
    "agent.max_turns": ("max_turns", 3),
    "agent.on_retrieval_error": ("on_retrieval_error", "degrade"),
    "agent.search_concurrency": ("search_concurrency", 9),
    "retriever.topk": ("topk", 5),
    "retriever.timeout_s": ("retrieval_timeout_s", 12.0),
    "retriever.max_retries": ("retrieval_max_retries", 1),
    "eval.interval": ("eval_interval", 4),
    "reward.structure_format_score": ("structure_format_score", 0.2),
    "reward.final_format_score": ("final_format_score", 0.1),
    "reward.retrieval_score": ("retrieval_score", 0.05),
}
OBJECTIVE_FIELDS = {
    "eps_clip",
    "eps_clip_high",
    "use_kl_loss",
    "kl_loss_type",
    "kl_loss_coef",
    "entropy_coef",
    "use_tis",
}


def nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def test_every_settings_field_without_a_default_is_a_recipe_key():
    required = {f.name for f in fields(GRPOSettings) if f.default is f.default_factory}  # both MISSING
    assert required == {name for name, _ in RECIPE.values()}
    assert {f.name for f in fields(ObjectiveSettings) if f.default is f.default_factory} == OBJECTIVE_FIELDS


@pytest.mark.parametrize("key", list(RECIPE))
def test_changing_a_config_value_changes_its_field_and_only_it(key):
    name, value = RECIPE[key]
    base = GRPOSettings.from_config(config(toy=True)).to_dict()
    assert base[name] != value, f"pick another test value for {key}"
    changed = GRPOSettings.from_config(config(toy=True, **nested(key, value)))  # validated by the schema
    assert {k for k, v in changed.to_dict().items() if v != base[k]} == {name}
    assert getattr(changed, name) == value
    objective = changed.objective()
    if name in OBJECTIVE_FIELDS:
        assert getattr(objective, name) == value
    base_objective = GRPOSettings.from_config(config(toy=True)).objective()
    assert {
        f.name for f in fields(ObjectiveSettings) if getattr(objective, f.name) != getattr(base_objective, f.name)
    } == ({name} & OBJECTIVE_FIELDS)


# --- learning-rate schedules (optimizer step i of n; the last step is the end of the decay) ---------------


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("constant", [1e-3, 1e-3, 1e-3, 1e-3, 1e-3]),
        ("linear", [1e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.0]),
        # 0.5 * (1 + cos(pi * i / 4)): 1, (2 + sqrt 2) / 4, 1/2, (2 - sqrt 2) / 4, 0
        ("cosine", [1e-3, (2 + math.sqrt(2)) / 4 * 1e-3, 0.5e-3, (2 - math.sqrt(2)) / 4 * 1e-3, 0.0]),
    ],
)
def test_lr_schedule_by_hand(style, expected):
    s = grpo_settings(lr=1e-3, lr_decay_style=style)
    assert [lr_at(s, i, 5) for i in range(5)] == pytest.approx(expected, abs=1e-15)
    assert lr_at(s, 9, 5) == pytest.approx(expected[-1], abs=1e-15)  # past the end: held at the end value


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_a_single_optimizer_step_uses_the_full_lr(style):
    assert lr_at(grpo_settings(lr=2e-4, lr_decay_style=style), 0, 1) == 2e-4


def test_reward_settings_follow_the_reward_section():
    from searchr1.reward import RewardSettings

    s = GRPOSettings.from_config(config(toy=True, reward={"structure_format_score": 0.2, "final_format_score": 0.1}))
    assert s.reward == RewardSettings(0.2, 0.1, 0.0)
    assert GRPOSettings.from_config(config(toy=True)).reward.is_exact_match  # the recipe: EM
