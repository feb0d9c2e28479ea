"""The local GRPO trainer: rollouts through the real agent loop, slime's objective, resumable checkpoints.

One step = one rollout id (slime's unit): ``rollout_batch_size`` prompts x ``n_samples_per_prompt``
samples through ``searchr1.agent.run_agent`` on an ``HFEngine`` wrapping the policy being trained,
rewards (``reward.*``: EM, or Search-R1's format-aware score), group-normalised advantages, then
``steps_per_rollout`` optimizer steps of ``global_batch_size`` samples each. Everything random is seeded
per step, so a run killed and rerun resumes from its latest checkpoint and ends with the same numbers as an
uninterrupted run (on CPU).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchr1.grpo.checkpoint import (
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from searchr1.grpo.data import PromptOrder, load_prompt_rows
from searchr1.grpo.logprobs import TokenBatch, scored_positions, token_logprobs
from searchr1.grpo.objective import group_advantages, grpo_loss
from searchr1.grpo.settings import GRPOSettings
from searchr1.metrics_file import truncate_metrics

# eval_hook(step, policy, tokenizer, before_training=...): a learning-curve point at rollout ``step``. As slime's
# train.py: once before the first update (rollout 0, before_training=True; only when training starts from step
# 0, not on resume), then after rollout ``step`` whenever (step + 1) % eval_interval == 0.
EvalHook = Callable[..., None]

# Reported per step, as means over the step's samples (slime reports per-sample means the same way).
_LOSS_METRICS = (
    "pg_loss",
    "clipfrac",
    "ppo_kl",
    "entropy",
    "kl",
    "tis",
    "tis_clipfrac",
    "train_rollout_logprob_abs_diff",
)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.torch.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


def step_seed(seed: int, step: int) -> int:
    """The seed of everything random in rollout ``step`` (sampling), independent of earlier steps."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint32)[0])


def lr_at(settings: GRPOSettings, optimizer_step: int, total_optimizer_steps: int) -> float:
    if settings.lr_decay_style == "constant" or total_optimizer_steps <= 1:
        return settings.lr
    frac = min(optimizer_step / (total_optimizer_steps - 1), 1.0)
    if settings.lr_decay_style == "linear":
        return settings.lr * (1.0 - frac)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def _load_model(path: str | Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    # fp32 weights (the optimizer's master copy); bf16 only inside autocast.
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)


def build_optimizer(model: torch.nn.Module, settings: GRPOSettings) -> torch.optim.Optimizer:
    # Megatron's default: no weight decay on biases and 1-D parameters (norms).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups, lr=settings.lr, betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps
    )


def _atomic_export(model: Any, tokenizer: Any, export_dir: Path) -> None:
    from searchr1.fsutil import publish_dir

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    publish_dir(export_dir, fill)


class _Trainer:
    def __init__(self, settings: GRPOSettings, policy, reference, tokenizer, optimizer, device: torch.device):
        self.s = settings
        self.policy, self.reference, self.tokenizer, self.optimizer = policy, reference, tokenizer, optimizer
        self.device = device
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    # -- rollout ---------------------------------------------------------------------------------
    def rollout(self, loop: asyncio.AbstractEventLoop, retriever: Any, prompts: list[str], seed: int) -> list[Any]:
        from searchr1.agent import AgentConfig, run_agent
        from searchr1.engines import HFEngine

        engine = HFEngine(
            self.policy,
            self.tokenizer,
            device=self.device,
            max_batch_size=self.s.generation_batch_size,
            seed=seed,
            autocast_bf16=self.s.bf16_autocast,
        )
        cfg = AgentConfig(
            max_turns=self.s.max_turns,
            topk=self.s.topk,
            max_new_tokens=self.s.rollout_max_response_len,
            temperature=self.s.rollout_temperature,
            top_p=self.s.rollout_top_p,
            top_k=self.s.rollout_top_k,
            on_retrieval_error=self.s.on_retrieval_error,
        )
        return loop.run_until_complete(run_agent(engine, retriever, self.tokenizer, prompts, cfg))

    # -- training --------------------------------------------------------------------------------
    def _micro_batches(self, indices: list[int], trajs: list[Any]) -> list[list[int]]:
        # Samples with no trained token (e.g. aborted at once) add nothing to the loss: skip them.
        useful = [i for i in indices if sum(trajs[i].loss_mask) > 0]
        size = self.s.micro_batch_size
        return [useful[k : k + size] for k in range(0, len(useful), size)]

    def _batch(self, ids: list[int], trajs: list[Any]) -> TokenBatch:
        return TokenBatch(
            sequences=[list(trajs[i].prompt_ids) + list(trajs[i].response_ids) for i in ids],
            positions=[scored_positions(len(trajs[i].prompt_ids), trajs[i].loss_mask) for i in ids],
        )

    def _logprobs(self, model, batch: TokenBatch, *, with_entropy: bool = False):
        return token_logprobs(
            model,
            batch,
            temperature=self.s.rollout_temperature,
            pad_token_id=self.pad_token_id,
            device=self.device,
            bf16_autocast=self.s.bf16_autocast,
            with_entropy=with_entropy,
        )

    def _frozen_logprobs(self, model, trajs: list[Any]) -> list[torch.Tensor]:
        """Per sample, logprobs of its trained tokens under ``model`` without gradients."""
        out: list[torch.Tensor] = [torch.zeros(0, device=self.device) for _ in trajs]
        with torch.no_grad():
            for mb in self._micro_batches(list(range(len(trajs))), trajs):
                lp, _ = self._logprobs(model, self._batch(mb, trajs))
                for i, chunk in zip(mb, lp.split(self._batch(mb, trajs).sample_lengths), strict=True):
                    out[i] = chunk
        return out

    def train_on_rollout(
        self, trajs: list[Any], advantages: torch.Tensor, optimizer_step: int, total_optimizer_steps: int
    ) -> dict[str, float]:
        s = self.s
        self.policy.eval()  # dropout off: slime trains with attention/hidden dropout 0
        ref_lps = self._frozen_logprobs(self.reference, trajs) if s.use_kl_loss else None
        # With one optimizer step per rollout the policy has not moved yet, so the current logprobs
        # (detached) are the old ones: slime makes the same substitution when no old logprobs are given.
        old_lps = self._frozen_logprobs(self.policy, trajs) if s.steps_per_rollout > 1 else None
        rollout_lps = [
            torch.tensor([lp for lp, m in zip(t.logprobs, t.loss_mask) if m], dtype=torch.float32, device=self.device)
            for t in trajs
        ]
        sums: dict[str, float] = {}
        grad_norms = []
        objective = s.objective()
        for g in range(s.steps_per_rollout):
            step_ids = list(range(g * s.global_batch_size, (g + 1) * s.global_batch_size))
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(s, optimizer_step + g, total_optimizer_steps)
            self.optimizer.zero_grad(set_to_none=True)
            for mb in self._micro_batches(step_ids, trajs):
                batch = self._batch(mb, trajs)
                with torch.enable_grad():
                    lp, entropy = self._logprobs(self.policy, batch, with_entropy=True)
                if not s.entropy_coef and entropy is not None:
                    entropy = entropy.detach()
                old = torch.cat([old_lps[i] for i in mb]) if old_lps is not None else lp.detach()
                adv = torch.cat(
                    [advantages[i].expand(n).to(self.device) for i, n in zip(mb, batch.sample_lengths, strict=True)]
                )
                loss, metrics = grpo_loss(
                    log_probs=lp,
                    old_log_probs=old,
                    advantages=adv,
                    sample_lengths=batch.sample_lengths,
                    step_num_samples=len(step_ids),
                    settings=objective,
                    ref_log_probs=torch.cat([ref_lps[i] for i in mb]) if ref_lps is not None else None,
                    rollout_log_probs=torch.cat([rollout_lps[i] for i in mb]),
                    entropy=entropy,
                )
                loss.backward()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else float("inf"))
            grad_norms.append(float(norm))
            self.optimizer.step()
        n = len(trajs)
        out = {key: sums[key] / n for key in _LOSS_METRICS if key in sums}
        out["grad_norm"] = float(np.mean(grad_norms))
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out


def _rollout_metrics(trajs: list[Any], rewards: list[float], em: list[float], group_size: int) -> dict[str, float]:
    grouped = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    return {
        "reward_mean": float(np.mean(rewards)),  # the training reward (reward.*: shaped when a score is non-zero)
        "em_mean": float(np.mean(em)),  # exact match of the same rollouts
        "response_len_mean": float(np.mean([sum(t.loss_mask) for t in trajs])),
        "response_len_total_mean": float(np.mean([len(t.response_ids) for t in trajs])),
        "searches_mean": float(np.mean([t.num_searches for t in trajs])),
        "search_rate": float(np.mean([t.num_searches > 0 for t in trajs])),
        "answered_rate": float(np.mean([bool(t.answered) for t in trajs])),
        "format_valid_rate": float(np.mean([bool(t.format_valid) for t in trajs])),
        "truncated_ratio": float(np.mean([t.status == "truncated" for t in trajs])),
        "aborted_ratio": float(np.mean([t.status == "aborted" for t in trajs])),
        "zero_std_group_frac": float(np.mean(grouped.std(axis=1) == 0)),
        "retrieval_failures": int(sum(t.retrieval_failures for t in trajs)),
    }


def train_grpo(
    *,
    policy_dir: str | Path,
    train_parquet: str | Path,
    work_dir: str | Path,
    metrics_path: str | Path,
    export_dir: str | Path,
    retriever_url: str | None,
    settings: GRPOSettings,
    eval_hook: EvalHook | None = None,
    retriever: Any | None = None,
) -> dict[str, Any]:
    """Train ``policy_dir`` with GRPO for ``settings.num_rollout`` steps; resume from ``work_dir`` if possible.

    ``retriever`` (optional) replaces the ``RetrievalClient(retriever_url)`` the trainer would make: any
    object with ``async search(queries, topk)``. Returns a summary dict (steps, resumed_from, export_dir, ...).
    """
    from transformers import AutoTokenizer

    started = time.monotonic()
    s = settings
    work_dir, metrics_path, export_dir = Path(work_dir), Path(metrics_path), Path(export_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(s.device)

    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    rows = load_prompt_rows(train_parquet, tokenizer)
    reward = s.reward
    for row in rows:  # a format score needs the assistant marker in every prompt (RewardConfigError otherwise)
        reward.check_prompt(row.prompt_text)
    order = PromptOrder(len(rows), s.rollout_batch_size, seed=s.seed, shuffle=s.rollout_shuffle)

    ckpt = load_latest_checkpoint(work_dir)
    start_step = ckpt.completed_steps if ckpt else 0
    policy = _load_model(ckpt.model_dir if ckpt else policy_dir, device)
    reference = None
    if s.use_kl_loss:
        reference = _load_model(policy_dir, device).eval()
        reference.requires_grad_(False)
    optimizer = build_optimizer(policy, s)
    if ckpt:
        optimizer.load_state_dict(ckpt.optimizer_state)
        restore_rng_state(ckpt.rng_state)
        print(f"[grpo] resuming from {ckpt.path} ({start_step} rollouts done)", file=sys.stderr, flush=True)
    else:
        torch.manual_seed(s.seed)
    truncate_metrics(metrics_path, start_step)

    trainer = _Trainer(s, policy, reference, tokenizer, optimizer, device)
    total_optimizer_steps = s.num_rollout * s.steps_per_rollout
    loop = asyncio.new_event_loop()
    own_retriever = retriever is None
    if own_retriever:
        if not retriever_url:
            raise ValueError("train_grpo needs retriever_url (or a retriever object)")
        from searchr1.retrieval.client import RetrievalClient

        retriever = RetrievalClient(
            retriever_url,
            timeout_s=s.retrieval_timeout_s,
            max_retries=s.retrieval_max_retries,
            concurrency=s.search_concurrency,
        )
    try:
        if eval_hook is not None and s.eval_interval and start_step == 0:
            # slime evaluates before the first update (train.py, unless --skip-eval-before-train): the curve's
            # first point is the starting policy, at rollout 0
            eval_hook(0, policy, tokenizer, before_training=True)
        for step in range(start_step, s.num_rollout):
            t0 = time.monotonic()
            seed = step_seed(s.seed, step)
            torch.manual_seed(seed)
            batch_rows = [rows[i] for i in order.batch(step)]
            prompts = [r.prompt_text for r in batch_rows for _ in range(s.n_samples_per_prompt)]
            goldens = [r.golden_answers for r in batch_rows for _ in range(s.n_samples_per_prompt)]
            trajs = trainer.rollout(loop, retriever, prompts, seed)
            rollout_time = time.monotonic() - t0

            from searchr1.reward import em_score

            rewards = [float(reward.score(t.full_text, g)) for t, g in zip(trajs, goldens, strict=True)]
            em = [float(em_score(t.full_text, g)) for t, g in zip(trajs, goldens, strict=True)]
            if s.rewards_normalization:
                advantages = group_advantages(
                    rewards, s.n_samples_per_prompt, std_normalization=s.grpo_std_normalization
                )
            else:
                advantages = torch.tensor(rewards, dtype=torch.float32)
            train_metrics = trainer.train_on_rollout(
                trajs, advantages, step * s.steps_per_rollout, total_optimizer_steps
            )
            record = {"step": step, **_rollout_metrics(trajs, rewards, em, s.n_samples_per_prompt), **train_metrics}
            record["rollout_time_s"] = rollout_time
            record["wall_time_s"] = time.monotonic() - t0
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            print(
                f"[grpo] step {step + 1}/{s.num_rollout} reward {record['reward_mean']:.3f} em {record['em_mean']:.3f} "
                f"search {record['search_rate']:.2f} len {record['response_len_mean']:.1f} "
                f"kl {record.get('kl', 0.0):.4f} clip {record['clipfrac']:.3f} "
                f"gnorm {record['grad_norm']:.3f} ({record['wall_time_s']:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
            done = step + 1
            # The learning-curve point before the checkpoint: a kill between the two resumes from the previous
            # checkpoint and evaluates this step again (the hook replaces its point), never skips it.
            if eval_hook is not None and s.eval_interval and done % s.eval_interval == 0:
                eval_hook(step, policy, tokenizer, before_training=False)
            if done % s.checkpoint_interval == 0 or done == s.num_rollout:
                save_checkpoint(
                    work_dir,
                    completed_steps=done,
                    model=policy,
                    optimizer=optimizer,
                    state={"data_position": order.position(done), "seed": s.seed, "settings": s.to_dict()},
                    keep=s.keep_checkpoints,
                )
            if s.save_hf_interval and done % s.save_hf_interval == 0 and done != s.num_rollout:
                # an HF export kept at the configured interval (the final one is export_dir, below)
                _atomic_export(policy, tokenizer, work_dir / "hf" / f"iter_{done}")
    finally:
        if own_retriever:
            loop.run_until_complete(retriever.aclose())
        loop.close()

    _atomic_export(policy, tokenizer, export_dir)
    return {
        "steps": s.num_rollout,
        "resumed_from": start_step if ckpt else None,
        "export_dir": str(export_dir),
        "metrics_path": str(metrics_path),
        "wall_time_s": time.monotonic() - started,
        "device": str(device),
    }
