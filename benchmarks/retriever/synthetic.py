"""Synthetic data of the retriever benchmarks: flat indexes of random unit vectors, a corpus with one row
per vector, question-like queries, and an e5-base-shaped query encoder (random weights, e5-base-v2's shape)
built locally because the GPU machines download nothing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from searchr1.fsutil import open_atomic


def write_synthetic_flat_index(
    path: Path, n: int, dim: int, *, seed: int = 0, chunk: int = 100_000, use_gpu: bool = False
) -> None:
    """Write a faiss IndexFlatIP file of ``n`` random unit vectors, streaming (no full copy in RAM).

    ``use_gpu``: draw them with torch on the GPU (a 10M x 768 index in seconds instead of minutes of
    numpy); the vectors differ from the numpy ones of the same seed, both are random unit vectors.
    """
    rng = np.random.default_rng(seed)
    gen = None
    if use_gpu:
        import torch

        gen = torch.Generator(device="cuda").manual_seed(seed)
        chunk = max(chunk, 1 << 20)
    with open_atomic(path, "wb") as f:
        # faiss header: fourcc, d, ntotal, 2 dummies, is_trained, metric (0 = inner product), n floats.
        f.write(b"IxFI" + struct.pack("<iqqqBiQ", dim, n, 1 << 20, 1 << 20, 1, 0, n * dim))
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            if gen is not None:
                x = (
                    torch.nn.functional.normalize(torch.randn((rows, dim), generator=gen, device="cuda"), dim=1)
                    .cpu()
                    .numpy()
                )
            else:
                x = rng.standard_normal((rows, dim), dtype=np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(x.tobytes())


def write_synthetic_corpus(path: Path, n: int, *, chunk: int = 1 << 20) -> None:
    """``n`` Search-R1 corpus rows ``{"id", "contents": '"Synthetic <i>"\\nSynthetic passage number <i>.'}``.

    Every number is written with 10 digits, so all rows have one width and are made with numpy a
    million at a time (21M rows in seconds; one ``json.dumps`` per row took minutes).
    """
    template = (
        json.dumps({"id": "0" * 10, "contents": f'"Synthetic {"0" * 10}"\nSynthetic passage number {"0" * 10}.'}) + "\n"
    )
    row = np.frombuffer(template.encode(), dtype=np.uint8)
    fields = [
        i for i in range(len(template) - 9) if template[i : i + 10] == "0" * 10 and (i == 0 or template[i - 1] != "0")
    ]
    powers = 10 ** np.arange(9, -1, -1, dtype=np.int64)
    with open_atomic(path, "wb") as f:
        for start in range(0, n, chunk):
            ids = np.arange(start, min(start + chunk, n), dtype=np.int64)
            digits = ((ids[:, None] // powers) % 10 + 48).astype(np.uint8)
            rows = np.tile(row, (len(ids), 1))
            for pos in fields:
                rows[:, pos : pos + 10] = digits
            f.write(rows.tobytes())


def synthetic_queries(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct question-like queries (distinct numbers), so nothing can be de-duplicated."""
    rng = np.random.default_rng(seed)
    subjects = ["river", "king", "album", "treaty", "novel", "mountain", "film", "election", "bridge", "species"]
    asks = ["who wrote the", "when was the", "where is the", "what is the name of the", "how long is the"]
    numbers = rng.choice(10**6, size=n, replace=False)
    return [f"{asks[rng.integers(len(asks))]} {subjects[rng.integers(len(subjects))]} number {k}" for k in numbers]


_WORDS = (
    "query passage who what when where which how is was the of in a an to by for wrote born name "
    "river king album treaty novel mountain film election bridge species number long directed "
    "capital country city won first largest song written played team president"
).split()


def make_e5_shaped_encoder(workdir: Path, device: str, layers: int = 12):
    """Our ``Encoder`` over ``make_e5_shaped_model`` (in fp16 on CUDA)."""
    from searchr1.config import default_config
    from searchr1.retrieval.encoder import Encoder

    enc = default_config()["retriever"]["encoder"]  # e5-base-v2's text settings, as the seed run serves it
    return Encoder(
        make_e5_shaped_model(workdir, layers),
        query_prefix=enc["query_prefix"],
        passage_prefix=enc["passage_prefix"],
        pooling=enc["pooling"],
        normalize=enc["normalize"],
        max_length=enc["max_length"],
        cpu_bf16=enc["cpu_bf16"],
        device=device,
    )


def make_e5_shaped_model(workdir: Path, layers: int = 12) -> Path:
    """A randomly initialised BertModel with e5-base-v2's config, saved as a Hugging Face model directory.

    The tokenizer is a WordPiece over a synthetic 30,522-entry vocabulary (e5-base-v2's size) with
    the words of the synthetic queries, so queries tokenize to a realistic ~10-16 tokens.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    model_dir = workdir / ("e5-base-shaped-random" if layers == 12 else f"e5-base-shaped-random-{layers}-layers")
    if not (model_dir / "config.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(i) for i in range(10)] + list(":?,.'-")
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + _WORDS
        vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
        (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt"), do_lower_case=True).save_pretrained(model_dir)
        config = BertConfig(
            vocab_size=30522,
            hidden_size=768,
            num_hidden_layers=layers,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            type_vocab_size=2,
        )
        torch.manual_seed(0)
        BertModel(config).save_pretrained(model_dir)
    return model_dir
