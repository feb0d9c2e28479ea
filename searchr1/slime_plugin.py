"""What slime (>= v0.3.1) imports: the Search-R1 generate/reward functions and our metrics log hooks.

    --custom-generate-function-path searchr1.slime_plugin.generate
    --custom-rm-path searchr1.slime_plugin.reward_func
    --custom-rollout-log-function-path searchr1.slime_plugin.log_rollout
    --custom-eval-rollout-log-function-path searchr1.slime_plugin.log_eval
    --custom-config-path search.yaml   # search_url, search_topk, ... (slime setattr()s every key on args)

``generate`` adapts slime's ``Sample`` to ``searchr1.agent.run_agent``: the agent talks to SGLang
through slime's own ``post`` (``SlimePostEngine``) and to the retriever through ``RetrievalClient``;
the trajectory is written back with ``Sample.append_response_tokens`` segment by segment (model
tokens trainable with their logprobs, observations not), exactly as slime's search-r1 example does.
slime is imported inside the functions, so this module imports without slime installed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from searchr1.agent import AgentConfig, Trajectory, run_agent
from searchr1.engines import GenerationOutput, GenerationRequest, input_fields, parse_sglang_output
from searchr1.metrics_file import write_curve_point
from searchr1.retrieval.client import RetrievalClient
from searchr1.reward import (
    EM_REWARD_KEY,
    TRAINING_REWARD_KEY,
    RewardSettings,
    em_score,
    extract_answer_from_response,
    is_valid_sequence,
)

logger = logging.getLogger(__name__)

# Our settings reach slime's ``args`` through --custom-config-path: searchr1.slime_launch.custom_config
# writes every key below from the workflow config (their one home), so none has a default here.
REQUIRED_ARGS = (
    "search_url",
    "search_topk",
    "search_max_turns",
    "search_on_error",
    "search_timeout_s",
    "search_max_retries",
    "search_concurrency",
    "search_input_mode",
    # the reward.* scores (searchr1.reward.RewardSettings)
    "search_structure_format_score",
    "search_final_format_score",
    "search_retrieval_score",
)
# Not a config key: one /retrieve call per turn for the whole batch instead of one per trajectory.
SEARCH_BATCH_DEFAULT = False


class PluginConfigError(RuntimeError):
    """slime's args lack a setting the plugin needs (the custom config was not the one we write)."""


def _arg(args: Any, name: str) -> Any:
    value = getattr(args, name, None)
    if value is None:
        if name == "search_batch":
            return SEARCH_BATCH_DEFAULT
        raise PluginConfigError(
            f"slime args have no {name!r}: pass --custom-config-path with the file searchr1.slime_launch."
            f"write_custom_config writes (keys: {', '.join(REQUIRED_ARGS)})"
        )
    return value


def agent_config_from_args(args: Any, sampling_params: dict[str, Any]) -> AgentConfig:
    """AgentConfig from slime's per-call sampling params (rollout or eval) and our ``search_*`` args."""
    return AgentConfig(
        max_turns=int(_arg(args, "search_max_turns")),
        topk=int(_arg(args, "search_topk")),
        max_new_tokens=int(sampling_params["max_new_tokens"]),
        temperature=float(sampling_params.get("temperature", 1.0)),
        top_p=float(sampling_params.get("top_p", 1.0)),
        top_k=int(sampling_params.get("top_k", -1)),
        on_retrieval_error=str(_arg(args, "search_on_error")),
    )


class SlimePostEngine:
    """The Engine protocol over slime's ``post`` to the SGLang router's /generate.

    It starts from slime's sampling params (so stop_token_ids, skip_special_tokens, custom_params etc.
    pass through), sets the request's own sampling fields, and adds the agent's stop strings to any
    configured ones. The context goes as text (slime's example) or token ids, by ``search_input_mode``:
    see searchr1.engines.input_fields.
    """

    def __init__(
        self,
        url: str,
        base_sampling_params: dict[str, Any],
        post: Callable[..., Any],
        input_mode: str = "text",
    ) -> None:
        self.input_mode = input_mode
        self.url = url
        self.base_sampling_params = dict(base_sampling_params)
        self.post = post

    def payload(self, request: GenerationRequest) -> dict[str, Any]:
        configured = self.base_sampling_params.get("stop") or []
        if isinstance(configured, str):
            configured = [configured]
        params = {
            **self.base_sampling_params,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "max_new_tokens": request.max_new_tokens,
            "stop": list(dict.fromkeys([*configured, *request.stop])),
            "no_stop_trim": True,
        }
        return {**input_fields(request, self.input_mode), "sampling_params": params, "return_logprob": True}

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        async def one(request: GenerationRequest) -> GenerationOutput:
            return parse_sglang_output(await self.post(self.url, self.payload(request)))

        return list(await asyncio.gather(*(one(r) for r in requests)))


# One retriever client (one connection pool) per event loop and setting; slime calls generate()
# concurrently for every sample of a rollout on one loop.
_RETRIEVERS: dict[tuple, RetrievalClient] = {}
_RETRIEVERS_LOCK = threading.Lock()


def retriever_for(args: Any) -> RetrievalClient:
    settings = (
        str(_arg(args, "search_url")),
        float(_arg(args, "search_timeout_s")),
        int(_arg(args, "search_max_retries")),
        int(_arg(args, "search_concurrency")),
        bool(_arg(args, "search_batch")),
    )
    key = (id(asyncio.get_running_loop()), *settings)
    with _RETRIEVERS_LOCK:
        client = _RETRIEVERS.get(key)
        if client is None:
            url, timeout_s, max_retries, concurrency, batch = settings
            client = RetrievalClient(
                url, timeout_s=timeout_s, max_retries=max_retries, concurrency=concurrency, batch=batch
            )
            _RETRIEVERS[key] = client
        return client


_STATUS_NAMES = {"completed": "COMPLETED", "truncated": "TRUNCATED", "aborted": "ABORTED"}


def fill_sample(args: Any, sample: Any, traj: Trajectory, sample_cls: Any) -> None:
    """Write a trajectory into a slime Sample: tokens, loss mask, logprobs, response, status, metadata."""
    sample.tokens = list(traj.prompt_ids)
    sample.response = ""
    sample.response_length = 0
    sample.loss_mask = []
    sample.rollout_log_probs = None
    for segment in traj.segments:
        if segment.trainable:
            sample.append_response_tokens(
                args,
                tokens=segment.token_ids,
                log_probs=segment.logprobs,
                trainable=True,
                meta_info=segment.meta_info,
            )
        else:
            sample.append_response_tokens(args, tokens=segment.token_ids, trainable=False)
    sample.response = traj.response_text
    sample.status = getattr(sample_cls.Status, _STATUS_NAMES[traj.status])
    metadata = dict(sample.metadata or {})
    metadata.update(
        num_searches=traj.num_searches,
        queries=list(traj.queries),
        answered=traj.answered,
        extracted_answer=traj.extracted_answer,
        format_valid=traj.format_valid,
        retrieval_failures=traj.retrieval_failures,
        num_turns=traj.num_turns,
    )
    sample.metadata = metadata


async def generate(args: Any, sample: Any, sampling_params: dict[str, Any], evaluation: bool = False) -> Any:
    """slime's custom generate function: one Search-R1 rollout for ``sample``."""
    from slime.rollout.sglang_rollout import GenerateState
    from slime.utils.http_utils import post
    from slime.utils.types import Sample

    if getattr(args, "partial_rollout", False):
        raise ValueError("searchr1.slime_plugin.generate does not support --partial-rollout")
    if not isinstance(sample.prompt, str):
        raise TypeError(
            "sample.prompt must be the chat-templated string; run slime with --apply-chat-template "
            f"(got {type(sample.prompt).__name__})"
        )
    state = GenerateState(args)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    engine = SlimePostEngine(url, sampling_params, post, str(_arg(args, "search_input_mode")))
    cfg = agent_config_from_args(args, sampling_params)
    (traj,) = await run_agent(engine, retriever_for(args), state.tokenizer, [sample.prompt], cfg)
    fill_sample(args, sample, traj, Sample)
    return sample


def _golden_answers(sample: Any) -> Sequence[str]:
    label = sample.label
    try:
        return label["ground_truth"]["target"]
    except (TypeError, KeyError) as exc:
        raise ValueError(
            f"sample {sample.index}: label must be Search-R1's reward_model dict "
            f"{{'ground_truth': {{'target': [...]}}}} (--label-key reward_model), got {str(label)[:200]}"
        ) from exc


def reward_settings(args: Any) -> RewardSettings:
    """The ``reward.*`` scores, from the custom config's ``search_<name>`` keys."""
    return RewardSettings(**{name: float(_arg(args, f"search_{name}")) for name in RewardSettings.CONFIG_KEYS})


def _check_reward_keys(args: Any, reward: RewardSettings) -> bool:
    """Whether slime reads the reward as a dict (--reward-key), checked against what the reward settings need."""
    keys = (getattr(args, "reward_key", None), getattr(args, "eval_reward_key", None))
    if keys == (None, None) and reward.is_exact_match:
        return False
    if keys != (TRAINING_REWARD_KEY, EM_REWARD_KEY):
        raise PluginConfigError(
            f"slime args have reward_key={keys[0]!r}, eval_reward_key={keys[1]!r}; the plugin's reward needs "
            f"--reward-key {TRAINING_REWARD_KEY} --eval-reward-key {EM_REWARD_KEY} when a reward.* score is non-zero "
            f"({reward}) and neither flag otherwise (searchr1.slime_launch.recipe_flags passes them)"
        )
    return True


async def reward_func(args: Any, sample: Any, **kwargs: Any) -> float | dict[str, float]:
    """slime's custom reward: Search-R1's ``compute_score_em`` on the chat-templated prompt plus the whole response.

    All ``reward.*`` scores 0 (the seed recipe): the float EM, exactly as before, and slime runs without
    --reward-key. A non-zero score: ``{"score": shaped reward, "em": exact match, "format_valid": 0/1}``, and the
    launcher passes ``--reward-key score --eval-reward-key em``. At slime 624b824a the training path reads a dict
    reward only through ``Sample.get_reward_value`` (slime/utils/types.py:246-247: ``reward[args.reward_key]``),
    which feeds the GRPO advantages and ``rollout/raw_reward`` (slime/ray/rollout.py:612, _post_process_rewards)
    and the zero-std metrics (slime/observability/rollout_metrics.py:151); evaluation reads
    ``reward[args.eval_reward_key]`` (slime/rollout/sglang_rollout.py:617-620; ``--eval-reward-key`` defaults to
    ``--reward-key``, slime/utils/arguments.py:1887-1888), so ``eval/<split>`` and our curve stay EM.
    """
    text = sample.prompt + sample.response
    golden = _golden_answers(sample)
    reward = reward_settings(args)
    reward.check_prompt(sample.prompt)  # a format score behind a prompt without the assistant marker: refused
    if not _check_reward_keys(args, reward):
        return em_score(text, golden)
    return {
        TRAINING_REWARD_KEY: reward.score(text, golden),
        EM_REWARD_KEY: em_score(text, golden),
        "format_valid": float(is_valid_sequence(text)[0]),
    }


# ----------------------------------------------------------------------------------------------
# Log hooks: our JSONL metrics next to slime's own logging (they return False to keep it).
# ----------------------------------------------------------------------------------------------

_last_log_time: dict[str, float] = {}
_rollouts_logged: set[int] = set()  # rollout ids log_rollout saw in this process (log_eval's before_training)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _reward_value(args: Any, sample: Any) -> float:
    """The training reward slime used for ``sample`` (a dict reward: its --reward-key entry, as
    ``Sample.get_reward_value``)."""
    reward = sample.reward
    if isinstance(reward, dict):
        reward = reward[getattr(args, "reward_key", None) or TRAINING_REWARD_KEY]
    return float(reward) if reward is not None else 0.0


def _meta(sample: Any, key: str, default: Any = 0) -> Any:
    return (sample.metadata or {}).get(key, default)


def sample_metrics(args: Any, samples: Sequence[Any]) -> dict[str, float]:
    """The common metric keys (and our extras) over a list of slime Samples."""
    em = [em_score(s.prompt + s.response, _golden_answers(s)) for s in samples]
    metrics = {
        "reward_mean": _mean([_reward_value(args, s) for s in samples]),
        "em_mean": _mean(em),
        "response_len_mean": _mean([s.effective_response_length for s in samples]),
        "response_len_total_mean": _mean([s.response_length for s in samples]),
        "searches_mean": _mean([_meta(s, "num_searches") for s in samples]),
        "search_rate": _mean([_meta(s, "num_searches") > 0 for s in samples]),
        "answered_rate": _mean([bool(_meta(s, "answered", False)) for s in samples]),
        "format_valid_rate": _mean([bool(_meta(s, "format_valid", False)) for s in samples]),
        "truncated_ratio": _mean([s.status.name == "TRUNCATED" for s in samples]),
        "aborted_ratio": _mean([s.status.name == "ABORTED" for s in samples]),
        "retrieval_failures": int(sum(_meta(s, "retrieval_failures") for s in samples)),
    }
    group = int(getattr(args, "n_samples_per_prompt", 0) or 0)
    rewards = [_reward_value(args, s) for s in samples]
    if group > 0 and rewards and len(rewards) % group == 0:
        groups = [rewards[i : i + group] for i in range(0, len(rewards), group)]
        metrics["zero_std_group_frac"] = _mean([max(g) == min(g) for g in groups])
    return metrics


def _append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def log_rollout(
    rollout_id: int, args: Any, samples: list[Any], rollout_extra_metrics: dict | None, rollout_time: float
) -> bool:
    """--custom-rollout-log-function-path: one line per rollout step in ``args.search_metrics_path``."""
    _rollouts_logged.add(int(rollout_id))
    path = getattr(args, "search_metrics_path", None)
    if not path:
        logger.warning("search_metrics_path is not set; rollout %s metrics not written", rollout_id)
        return False
    now = time.time()
    # Step wall time = time since the previous rollout was logged (rollout + training in between).
    previous = _last_log_time.get(str(path))
    _last_log_time[str(path)] = now
    record: dict[str, Any] = {"step": int(rollout_id), **sample_metrics(args, samples)}
    record["rollout_time_s"] = float(rollout_time)
    record["wall_time_s"] = float(now - previous) if previous is not None else float(rollout_time)
    for key, value in (rollout_extra_metrics or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            record.setdefault(f"slime/{key}", value)
    _append_jsonl(path, record)
    return False


def log_eval(rollout_id: int, args: Any, data: dict[str, dict], extra_metrics: dict | None) -> bool:
    """--custom-eval-rollout-log-function-path: one line per (step, dataset) in ``args.search_eval_metrics_path``.

    ``data`` is slime's ``{name: {"rewards": [...], "truncated": [...], "samples": [Sample, ...]}}``.
    With ``args.search_eval_samples_dir`` set, per-question rows go to ``{dir}/{name}/step_{id}.jsonl``.
    """
    path = getattr(args, "search_eval_metrics_path", None)
    samples_dir = getattr(args, "search_eval_samples_dir", None)
    if not path and not samples_dir:
        logger.warning("search_eval_metrics_path is not set; eval %s metrics not written", rollout_id)
        return False
    # slime's train.py evaluates before the first update as rollout 0, and after rollout 0 (eval interval 1) as
    # rollout 0 again: the first is the one no rollout was logged before, in this process
    before_training = int(rollout_id) == 0 and not _rollouts_logged
    for name, entry in data.items():
        samples = entry.get("samples") or []
        rewards = entry.get("rewards") or []
        if path:
            record = {
                "step": int(rollout_id),
                "before_training": before_training,
                "dataset": name,
                "n": len(rewards),
                "reward_mean": _mean(rewards),
            }
            if samples:
                metrics = sample_metrics(args, samples)
                metrics.pop("reward_mean")
                record.update(metrics)
            # the learning-curve point of the torch backend (searchr1.evaluate.append_curve_point): exact match
            # (slime's eval reward is EM: the float reward, or the dict's --eval-reward-key em), with its 95%
            # interval; computed from the samples where slime passes them
            from searchr1.stats import wilson_ci

            em = [em_score(s.prompt + s.response, _golden_answers(s)) for s in samples] if samples else rewards
            low, high = wilson_ci(int(sum(1 for r in em if r >= 1.0)), len(em)) if em else (0.0, 0.0)
            record.update({"split": name, "em": _mean(em), "ci95_low": low, "ci95_high": high})
            write_curve_point(path, record)  # slime evaluates a step again after a resume: replaced, not doubled
        if samples_dir and samples:
            out = Path(samples_dir) / name / f"step_{int(rollout_id)}.jsonl"
            if out.exists():
                out.unlink()  # a rerun of the same step replaces its rows
            for s in samples:
                _append_jsonl(out, _eval_row(s))
    return False


def _eval_row(sample: Any) -> dict[str, Any]:
    golden = [str(g) for g in _golden_answers(sample)]
    return {
        "index": sample.index,
        "golden_answers": golden,
        "prompt": sample.prompt,
        "response": sample.response,
        "extracted_answer": extract_answer_from_response(sample.response),
        "em": em_score(sample.prompt + sample.response, golden),
        "num_searches": _meta(sample, "num_searches"),
        "response_tokens": sample.effective_response_length,
        "format_valid": bool(_meta(sample, "format_valid", False)),
        "status": sample.status.name.lower(),
    }


async def aclose_retrievers() -> None:
    """Close the retriever clients that belong to the running event loop (tidy shutdown, tests)."""
    loop_id = id(asyncio.get_running_loop())
    with _RETRIEVERS_LOCK:
        mine = [key for key in _RETRIEVERS if key[0] == loop_id]
        clients = [_RETRIEVERS.pop(key) for key in mine]
    for client in clients:
        await client.aclose()
