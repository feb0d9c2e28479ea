"""Generation engines behind one small protocol: token ids in; token ids, logprobs, text, finish reason out.

* ``HFEngine``: a local transformers model with our own batched sampling loop (left padding, KV cache),
  used by the toy world and by CPU/GPU evaluation without SGLang.
* ``SGLangEngine``: an SGLang server's native ``/generate`` endpoint (what slime's rollout talks to).

Both follow SGLang's conventions as slime configures them: stop strings are kept in the output
(``no_stop_trim``) and finish reasons are ``"stop"`` | ``"length"`` | ``"abort"``. ``SGLangEngine`` sends
exactly the sampling parameters of slime's rollouts and eval rollouts (:func:`sglang_sampling_params`),
``skip_special_tokens`` false included (slime's default); ``HFEngine`` decodes text without special tokens,
the same in the torch backend's training and in evaluation.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import torch

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "abort")


class EngineError(RuntimeError):
    """A generation backend failed or answered something we cannot use."""


@dataclass
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    # The same context as text (prompt + response so far), for servers fed text (input_mode "text").
    text: str | None = None


INPUT_MODES = ("text", "token_ids")


def input_fields(request: GenerationRequest, input_mode: str) -> dict[str, Any]:
    """What an SGLang /generate request carries as its context.

    "text" (the default, as slime's search-r1 example does) sends prompt + response as a string and SGLang
    re-tokenises it; "token_ids" sends the ids so far, so the policy is conditioned on exactly the tokens
    it is trained on (re-tokenising can differ at turn boundaries, e.g. where ``</search>`` meets
    ``\n\n<information>``). A request without text falls back to its ids.
    """
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
    if input_mode == "text" and request.text is not None:
        return {"text": request.text}
    return {"input_ids": list(request.input_ids)}


@dataclass
class GenerationOutput:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    # The backend's raw per-request metadata (SGLang's meta_info), for callers that need more than
    # the fields above (slime's Sample.append_response_tokens reads it). None for HFEngine.
    meta_info: dict[str, Any] | None = None


@runtime_checkable
class Engine(Protocol):
    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]: ...


def _validate_request(request: GenerationRequest, index: int) -> None:
    if not request.input_ids:
        raise ValueError(f"request {index}: input_ids is empty")
    if request.max_new_tokens < 0:
        raise ValueError(f"request {index}: max_new_tokens must be >= 0, got {request.max_new_tokens}")
    if request.temperature < 0:
        raise ValueError(f"request {index}: temperature must be >= 0, got {request.temperature}")
    if not 0.0 < request.top_p <= 1.0:
        raise ValueError(f"request {index}: top_p must be in (0, 1], got {request.top_p}")


# --------------------------------------------------------------------------------------------------
# Local transformers engine
# --------------------------------------------------------------------------------------------------


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    return ids


class HFEngine:
    """Batched sampling from a transformers causal LM with a KV cache.

    Temperature 0 is greedy. The logprob of each chosen token is ``log_softmax(logits / temperature)``
    (raw logits when greedy), i.e. before top-k/top-p filtering, as SGLang reports it. A row stops on
    an EOS id (the token is kept, as SGLang keeps it), on a stop string appearing in the decoded new
    text (kept: ``no_stop_trim``), or when its ``max_new_tokens`` are used up ("length").
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
        seed: int | None = None,
        autocast_bf16: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        # No .eval() here: the model may be a policy in training (searchr1.grpo); generation switches
        # to eval mode only for its own duration.
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.autocast_bf16 = autocast_bf16
        self.eos_token_ids = _eos_ids(tokenizer, model)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = min(self.eos_token_ids) if self.eos_token_ids else 0
        self.pad_token_id = int(pad)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        # Only the last position's logits are needed; computing all of them for a long prompt with a
        # 150k vocabulary would cost gigabytes.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._lock: asyncio.Lock | None = None

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.float32, **kw: Any
    ) -> HFEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return cls(model, tokenizer, device=device, **kw)

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        # One generation at a time (the model is not re-entrant); the work runs in a thread so the
        # event loop (retriever calls, servers in tests) stays responsive.
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await asyncio.to_thread(self.generate_sync, requests)

    def generate_sync(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        for i, request in enumerate(requests):
            _validate_request(request, i)
        was_training = bool(getattr(self.model, "training", False))
        self.model.eval()
        try:
            return self._generate_all(requests)
        finally:
            self.model.train(was_training)

    def _generate_all(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        # Similar lengths together: less padding per chunk.
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].input_ids))
        results: list[GenerationOutput | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            for i, output in zip(chunk, self._generate_batch([requests[i] for i in chunk]), strict=True):
                results[i] = output
        return [r for r in results if r is not None]

    def _forward(self, input_ids, attention_mask, position_ids, past_key_values):
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        )
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), out.past_key_values

    @torch.inference_mode()
    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        n = len(requests)
        lengths = [len(r.input_ids) for r in requests]
        width = max(lengths)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, width - lengths[row] :] = torch.tensor(request.input_ids, dtype=torch.long)
            attention_mask[row, width - lengths[row] :] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        # Left padding: positions count real tokens only, so padded rows match unpadded ones.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=self.device)
        top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=self.device)
        top_k = torch.tensor([r.top_k for r in requests], dtype=torch.long, device=self.device)

        new_tokens: list[list[int]] = [[] for _ in range(n)]
        new_logprobs: list[list[float]] = [[] for _ in range(n)]
        finish: list[str | None] = ["length" if r.max_new_tokens == 0 else None for r in requests]
        budget = max(r.max_new_tokens for r in requests)

        past = None
        step_ids, step_positions = input_ids, position_ids
        live = list(range(n))  # the request row of each row of the cache (finished rows leave it)
        for _ in range(budget):
            if all(finish[row] is not None for row in live):
                break
            logits, past = self._forward(step_ids, attention_mask, step_positions, past)
            if len(live) < n:
                # Sample over all n rows as if every row were still decoding (finished ones on a dummy
                # distribution, their tokens ignored): the generator's stream, and so every live row's
                # token, is the one the full batch would draw.
                full = logits.new_zeros((n, logits.shape[1]))
                full[live] = logits
                logits = full
            tokens, logprobs = self._pick(logits, temperature, top_p, top_k)
            token_list, logprob_list = tokens.tolist(), logprobs.tolist()
            for row in live:
                if finish[row] is not None:  # done (kept by a cache without row selection), or max_new_tokens 0
                    continue
                new_tokens[row].append(token_list[row])
                new_logprobs[row].append(logprob_list[row])
                finish[row] = self._finish_reason(requests[row], new_tokens[row])
            step_ids = tokens[live].unsqueeze(1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live), 1))], dim=1)
            step_positions = step_positions[:, -1:] + 1
            keep = [i for i, row in enumerate(live) if finish[row] is None]
            if keep and len(keep) < len(live) and hasattr(past, "batch_select_indices"):
                # Finished rows leave the batch (and the KV cache): each row's numbers do not depend on
                # the others, and late decode steps often carry a few long rows among many done ones.
                # (A cache without row selection keeps them, decoding ignored tokens as before.)
                index = torch.tensor(keep, device=self.device)
                past.batch_select_indices(index)
                step_ids, attention_mask, step_positions = step_ids[index], attention_mask[index], step_positions[index]
                live = [live[i] for i in keep]

        return [
            GenerationOutput(
                token_ids=new_tokens[row],
                logprobs=new_logprobs[row],
                text=self.tokenizer.decode(new_tokens[row], skip_special_tokens=True),
                finish_reason=finish[row] or "length",
            )
            for row in range(n)
        ]

    def _finish_reason(self, request: GenerationRequest, tokens: list[int]) -> str | None:
        if tokens[-1] in self.eos_token_ids:
            return "stop"
        if request.stop:
            # Decoded text, not token ids: a tag may be glued to neighbouring text in one token.
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(s in text for s in request.stop):
                return "stop"
        if len(tokens) >= request.max_new_tokens:
            return "length"
        return None

    def _pick(
        self, logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        greedy = temperature <= 0
        scale = torch.where(greedy, torch.ones_like(temperature), temperature)
        scaled = logits / scale.unsqueeze(1)
        logprobs_all = torch.log_softmax(scaled, dim=-1)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            vocab = logits.shape[-1]
            needs_filter = bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1.0).any())
            if needs_filter:
                sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
                ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
                k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
                drop = ranks >= k.unsqueeze(1)
                sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
                probs = torch.softmax(sorted_logits, dim=-1)
                # Nucleus: keep the smallest prefix whose mass reaches top_p (the first token always).
                mass_before = probs.cumsum(dim=-1) - probs
                drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
                drop[:, 0] = False
                probs = torch.softmax(sorted_logits.masked_fill(drop, -math.inf), dim=-1)
                choice = torch.multinomial(probs, 1, generator=self.generator)
                sampled = sorted_ids.gather(1, choice).squeeze(1)
            else:
                probs = torch.softmax(scaled, dim=-1)
                sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            tokens = torch.where(greedy, tokens, sampled)
        chosen = logprobs_all.gather(1, tokens.unsqueeze(1)).squeeze(1)
        return tokens, chosen


# --------------------------------------------------------------------------------------------------
# SGLang HTTP engine
# --------------------------------------------------------------------------------------------------


def sglang_sampling_params(request: GenerationRequest, *, skip_special_tokens: bool) -> dict[str, Any]:
    """The ``sampling_params`` slime sends for one request of our agent, field for field.

    slime 624b824a builds them in ``GenerateState.__init__`` (rollouts) and ``eval_rollout_single_dataset``
    (eval rollouts; ``slime/rollout/sglang_rollout.py:543-558``): temperature, top_p, top_k, max_new_tokens,
    stop (``--rollout-stop``, unset: None), stop_token_ids (``--rollout-stop-token-ids``, unset: None),
    skip_special_tokens (``--rollout-skip-special-tokens``, unset: False), no_stop_trim True and
    spaces_between_special_tokens False. Our plugin (searchr1.slime_plugin.SlimePostEngine) then sets the
    request's own temperature/top_p/top_k/max_new_tokens and the agent's stop strings.
    """
    return {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "max_new_tokens": request.max_new_tokens,
        "stop": list(request.stop),
        "stop_token_ids": None,
        "skip_special_tokens": skip_special_tokens,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }


def parse_sglang_output(output: Any) -> GenerationOutput:
    """Read an SGLang ``/generate`` reply (``return_logprob`` on) into a GenerationOutput; raise if malformed."""
    if not isinstance(output, dict) or not isinstance(output.get("meta_info"), dict):
        raise EngineError(f"SGLang reply has no meta_info: {str(output)[:300]}")
    meta = output["meta_info"]
    reason = meta.get("finish_reason")
    reason_type = reason.get("type") if isinstance(reason, dict) else reason
    if reason_type not in FINISH_REASONS:
        raise EngineError(f"SGLang reply has an unknown finish_reason {reason!r}")
    pairs = meta.get("output_token_logprobs")
    if pairs is None:
        if reason_type != "abort":
            raise EngineError("SGLang reply lacks meta_info.output_token_logprobs (was return_logprob sent?)")
        pairs = []
    token_ids, logprobs = [], []
    for pair in pairs:
        if pair[0] is None:
            raise EngineError(f"SGLang reply has a null logprob for output token {pair[1]}")
        logprobs.append(float(pair[0]))
        token_ids.append(int(pair[1]))
    text = output.get("text")
    if not isinstance(text, str):
        raise EngineError(f"SGLang reply has no text: {str(output)[:300]}")
    return GenerationOutput(
        token_ids=token_ids, logprobs=logprobs, text=text, finish_reason=reason_type, meta_info=meta
    )


class SGLangEngine:
    """POST {base_url}/generate, one request per GenerationRequest, at most ``concurrency`` in flight.

    ``input_mode`` chooses text (slime's example, the default) or token ids as the context: see
    :func:`input_fields`.
    Transport errors, timeouts and 5xx are retried ``max_retries`` times; everything else raises.
    """

    def __init__(
        self,
        base_url: str,
        *,
        skip_special_tokens: bool,  # the config's agent.skip_special_tokens (false: slime's default)
        concurrency: int = 256,
        timeout_s: float = 600,
        max_retries: int = 2,
        backoff_s: float = 1.0,
        input_mode: str = "text",
    ) -> None:
        input_fields(GenerationRequest(input_ids=[0], max_new_tokens=1), input_mode)  # validates the mode
        self.input_mode = input_mode
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url = base_url.rstrip("/") + "/generate"
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.skip_special_tokens = skip_special_tokens
        self._client: httpx.AsyncClient | None = None
        self._semaphore = asyncio.Semaphore(concurrency)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(max_connections=self.concurrency),
                trust_env=False,  # a local inference server: never through a proxy
            )
        return self._client

    def payload(self, request: GenerationRequest) -> dict[str, Any]:
        return {
            **input_fields(request, self.input_mode),
            "sampling_params": sglang_sampling_params(request, skip_special_tokens=self.skip_special_tokens),
            "return_logprob": True,
        }

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        for i, request in enumerate(requests):
            _validate_request(request, i)
        return list(await asyncio.gather(*(self._generate_one(r) for r in requests)))

    async def _generate_one(self, request: GenerationRequest) -> GenerationOutput:
        payload = self.payload(request)
        async with self._semaphore:
            for attempt in range(self.max_retries + 1):
                try:
                    response = await self._http().post(self.url, json=payload)
                except (httpx.TransportError, httpx.TimeoutException) as exc:
                    error: Exception = exc
                else:
                    if response.status_code < 400:
                        return parse_sglang_output(response.json())
                    error = EngineError(
                        f"SGLang {self.url} answered HTTP {response.status_code}: {response.text[:500]}"
                    )
                    if response.status_code < 500:
                        raise error
                if attempt < self.max_retries:
                    logger.warning("SGLang request failed (%s); retry %d/%d", error, attempt + 1, self.max_retries)
                    await asyncio.sleep(self.backoff_s * 2**attempt)
            raise EngineError(
                f"SGLang request to {self.url} failed after {self.max_retries + 1} attempts: {error}"
            ) from error

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
