"""GRPOSettings: every knob of the local GRPO trainer, read from the workflow config.

Values the config holds have no default here: ``from_config`` reads each from its key in ``CONFIG_KEYS``
(config.yaml is their one home; the schema checks them, and their relations, once, in searchr1.config).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from searchr1.config import FromConfig
from searchr1.grpo.objective import ObjectiveSettings
from searchr1.reward import RewardSettings


@dataclass
class GRPOSettings(FromConfig):
    seed: int
    # rollout (slime's --num-rollout, --rollout-batch-size, ...)
    num_rollout: int
    rollout_batch_size: int
    n_samples_per_prompt: int
    global_batch_size: int
    rollout_max_response_len: int
    rollout_temperature: float
    rollout_top_p: float
    rollout_shuffle: bool
    # agent (searchr1.agent.AgentConfig) and its retriever client
    max_turns: int
    topk: int
    on_retrieval_error: str
    search_concurrency: int
    retrieval_timeout_s: float
    retrieval_max_retries: int
    # objective (slime's GRPO flags)
    eps_clip: float
    eps_clip_high: float
    use_kl_loss: bool
    kl_loss_type: str
    kl_loss_coef: float
    entropy_coef: float
    use_tis: bool
    # the training reward (searchr1.reward.RewardSettings: Search-R1's compute_score_em scores)
    structure_format_score: float
    final_format_score: float
    retrieval_score: float
    # optimizer (Megatron's adam is decoupled-weight-decay AdamW)
    lr: float
    lr_decay_style: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    grad_clip: float
    # torch backend
    device: str
    micro_batch_size: int
    bf16_autocast: bool
    checkpoint_interval: int  # train.save_interval (both backends)
    keep_checkpoints: int  # train.keep_checkpoints
    save_hf_interval: int | None  # train.save_hf_interval: HF exports kept under <work>/hf/iter_<done>
    generation_batch_size: int
    eval_interval: int | None
    # Not config keys: slime's defaults, which the recipe never changes (--rollout-top-k, GRPO reward
    # normalisation by group mean and std).
    rollout_top_k: int = -1
    rewards_normalization: bool = True
    grpo_std_normalization: bool = True

    CONFIG_KEYS: ClassVar[dict[str, str]] = {
        "seed": "train.seed",  # the run's training seed (searchr1.experiments: one per train.seeds entry)
        **{
            k: f"train.{k}"
            for k in (
                "num_rollout",
                "rollout_batch_size",
                "n_samples_per_prompt",
                "global_batch_size",
                "rollout_max_response_len",
                "rollout_temperature",
                "rollout_top_p",
                "rollout_shuffle",
                "eps_clip",
                "eps_clip_high",
                "use_kl_loss",
                "kl_loss_type",
                "kl_loss_coef",
                "entropy_coef",
                "use_tis",
                "lr",
                "lr_decay_style",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "keep_checkpoints",
                "save_hf_interval",
            )
        },
        "checkpoint_interval": "train.save_interval",
        **{
            k: f"train.torch.{k}"
            for k in (
                "adam_eps",
                "grad_clip",
                "device",
                "micro_batch_size",
                "bf16_autocast",
                "generation_batch_size",
            )
        },
        "max_turns": "agent.max_turns",
        "on_retrieval_error": "agent.on_retrieval_error",
        "search_concurrency": "agent.search_concurrency",
        "topk": "retriever.topk",
        "retrieval_timeout_s": "retriever.timeout_s",
        "retrieval_max_retries": "retriever.max_retries",
        "eval_interval": "eval.interval",
        **{k: f"reward.{k}" for k in ("structure_format_score", "final_format_score", "retrieval_score")},
    }

    @property
    def reward(self) -> RewardSettings:
        return RewardSettings(**{name: getattr(self, name) for name in RewardSettings.CONFIG_KEYS})

    @property
    def samples_per_rollout(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps per rollout (slime: rollout samples / global batch size)."""
        return self.samples_per_rollout // self.global_batch_size

    def objective(self) -> ObjectiveSettings:
        # Every objective knob this object holds, by field name (a new one cannot be forgotten here).
        return ObjectiveSettings(
            **{f.name: getattr(self, f.name) for f in fields(ObjectiveSettings) if hasattr(self, f.name)}
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
