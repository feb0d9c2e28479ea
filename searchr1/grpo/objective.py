"""The GRPO objective slime optimises for the Search-R1 recipe, on plain torch tensors.

Each function mirrors one piece of slime (THUDM/slime at 624b824a) so the local trainer and the
slime run optimise the same loss:

* group-normalised advantages: ``RolloutManager._post_process_rewards`` (reward minus group mean,
  divided by group std + 1e-6; torch's unbiased std), broadcast to every response token
  (``get_grpo_returns``);
* PPO clipped ratio with clip-higher: ``compute_policy_loss``;
* low-variance KL (k3) to the frozen reference, clamped to [-10, 10]: ``compute_approx_kl``;
* truncated importance sampling between the trainer's and the rollout engine's logprobs:
  ``vanilla_tis_function`` (weights clamp(exp(train_old - rollout), tis_clip_low, tis_clip));
* aggregation: slime's default ``sum_of_sample_mean`` with one sample per rollout id, i.e. each
  sample's masked token mean, summed over the samples and divided by the step's sample count
  (``loss_function`` scales by ``num_microbatches / step_global_batch_size``).

All per-token tensors here are flat over the *loss-masked* tokens of a micro-batch, with
``sample_lengths`` giving how many belong to each sample (tokens with loss mask 0 never enter the
loss, so they are dropped before this point rather than multiplied by zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# slime's group-normalisation epsilon (rollout.py: ``rewards / (std + 1e-6)``).
GROUP_STD_EPS = 1e-6
# slime clamps the low_var_kl estimate for numerical stability.
LOW_VAR_KL_CLAMP = 10.0
KL_TYPES = ("k1", "k2", "k3", "low_var_kl")


def group_advantages(
    rewards: torch.Tensor | list[float],
    group_size: int,
    *,
    std_normalization: bool = True,
    eps: float = GROUP_STD_EPS,
) -> torch.Tensor:
    """Per-sample GRPO advantages: (r - group mean) / (group std + eps); groups are consecutive.

    A group whose rewards are all equal gets 0 (its numerator is 0). A group of one sample gets 0
    too (slime would produce NaN from the unbiased std of one value; mean-centring already makes it 0).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if std_normalization and group_size > 1:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + eps)
    return centred.flatten()


def approx_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate of the policy from the reference (Schulman's k1/k2/k3); low_var_kl = clamped k3."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"unknown kl_loss_type {kl_type!r}; expected one of {KL_TYPES}")
    log_ratio = log_probs.float() - ref_log_probs.float()
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k2":
        return log_ratio.pow(2) / 2.0
    kl = torch.exp(-log_ratio) - 1.0 + log_ratio
    if kl_type == "low_var_kl":
        kl = kl.clamp(min=-LOW_VAR_KL_CLAMP, max=LOW_VAR_KL_CLAMP)
    return kl


def clipped_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss max(-r A, -clip(r, 1-eps, 1+eps_high) A), the clip indicator, and ppo_kl (old - new)."""
    ppo_kl = old_log_probs - log_probs
    ratio = torch.exp(-ppo_kl)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    clipfrac = (clipped > unclipped).float()
    return torch.maximum(unclipped, clipped), clipfrac, ppo_kl


def tis_weights(
    train_old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    clip_high: float = 2.0,
    clip_low: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated importance weights between trainer and rollout engine: (weights, raw ratio, clip indicator)."""
    ratio = torch.exp(train_old_log_probs.detach() - rollout_log_probs)
    weights = ratio.clamp(min=clip_low, max=clip_high)
    return weights, ratio, (weights != ratio).float()


def sum_of_sample_means(values: torch.Tensor, sample_lengths: list[int]) -> torch.Tensor:
    """Sum over samples of each sample's mean over its loss-masked tokens (an empty sample adds 0)."""
    if values.shape[0] != sum(sample_lengths):
        raise ValueError(f"{values.shape[0]} token values for sample lengths summing to {sum(sample_lengths)}")
    total = values.new_zeros(())
    for chunk in values.split(sample_lengths):
        if chunk.numel():
            total = total + chunk.sum() / chunk.numel()
    return total


@dataclass
class ObjectiveSettings:
    """The loss's knobs: train.* keys of the config (no defaults here), and slime's TIS clip bounds."""

    eps_clip: float
    eps_clip_high: float
    use_kl_loss: bool
    kl_loss_type: str
    kl_loss_coef: float
    entropy_coef: float
    use_tis: bool
    # Not config keys: slime's --tis-clip / --tis-clip-low defaults, which the recipe leaves as they are.
    tis_clip: float = 2.0
    tis_clip_low: float = 0.0


def grpo_loss(
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    sample_lengths: list[int],
    step_num_samples: int,
    settings: ObjectiveSettings,
    ref_log_probs: torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The micro-batch loss to backpropagate, already divided by the optimizer step's sample count.

    ``advantages`` is per token (each sample's advantage repeated over its tokens). ``old_log_probs``
    are the trainer's logprobs before this rollout's updates (they also serve as TIS's train side).
    Returned metrics are *sums* of per-sample means (divide by the step's sample count to report).
    """
    if step_num_samples < 1:
        raise ValueError(f"step_num_samples must be >= 1, got {step_num_samples}")
    pg, clipfrac, ppo_kl = clipped_policy_loss(
        log_probs, old_log_probs, advantages, settings.eps_clip, settings.eps_clip_high
    )
    metrics: dict[str, float] = {}
    if settings.use_tis:
        if rollout_log_probs is None:
            raise ValueError("use_tis needs the rollout engine's logprobs")
        weights, ratio, tis_clipped = tis_weights(
            old_log_probs, rollout_log_probs, settings.tis_clip, settings.tis_clip_low
        )
        pg = pg * weights
        metrics["tis"] = float(sum_of_sample_means(ratio, sample_lengths))
        metrics["tis_clipfrac"] = float(sum_of_sample_means(tis_clipped, sample_lengths))
    pg_loss = sum_of_sample_means(pg, sample_lengths)
    loss = pg_loss
    metrics["pg_loss"] = float(pg_loss.detach())
    metrics["clipfrac"] = float(sum_of_sample_means(clipfrac, sample_lengths))
    metrics["ppo_kl"] = float(sum_of_sample_means(ppo_kl.detach(), sample_lengths))
    if entropy is not None:
        entropy_loss = sum_of_sample_means(entropy, sample_lengths)
        metrics["entropy"] = float(entropy_loss.detach())
        if settings.entropy_coef:
            loss = loss - settings.entropy_coef * entropy_loss
    if settings.use_kl_loss:
        if ref_log_probs is None:
            raise ValueError("use_kl_loss needs the reference model's logprobs")
        kl_loss = sum_of_sample_means(approx_kl(log_probs, ref_log_probs, settings.kl_loss_type), sample_lengths)
        metrics["kl"] = float(kl_loss.detach())
        loss = loss + settings.kl_loss_coef * kl_loss
    if rollout_log_probs is not None:
        diff = (old_log_probs.detach() - rollout_log_probs).abs()
        metrics["train_rollout_logprob_abs_diff"] = float(sum_of_sample_means(diff, sample_lengths))
    return loss / step_num_samples, metrics
