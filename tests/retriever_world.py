"""The model-free retriever world of the hostile-client and front-end tests: a tiny corpus, a hash encoder and
numpy search (no model, no faiss, no torch).

Its own module, importing nothing but numpy at its top (the server modules when an app is built), because the
server processes those tests start import it: a process that imported the test module instead would also
import pytest, httpx and the test helpers (jsonschema, yaml), a few tenths of a second per server.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

N_PASSAGES = 40
DIM = 16


class HashEncoder:
    """A deterministic unit vector per text. Test hooks: a text starting with ``slow`` makes the call
    take 0.3 s; ``per_call_s`` / ``per_text_s`` model an encoder's cost (fixed + per query)."""

    name = "hash-encoder"
    dim = DIM

    def __init__(self, per_call_s: float = 0.0, per_text_s: float = 0.0) -> None:
        self.per_call_s, self.per_text_s = per_call_s, per_text_s
        self.calls: list[list[str]] = []

    @staticmethod
    def vec(text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        cost = self.per_call_s + self.per_text_s * len(texts) + (0.3 if any(t.startswith("slow") for t in texts) else 0)
        if cost:
            time.sleep(cost)
        return np.stack([self.vec(t) for t in texts])

    encode_passages = encode_queries


class NumpyBackend:
    """Exact inner-product search in numpy (no faiss/torch import: subprocesses start fast)."""

    name = "numpy"
    dim = DIM

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors
        self.ntotal = len(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self.vectors.T
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, ids, 1), ids


class World:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.corpus_path = root / "corpus.jsonl"
        rows = [
            {"id": f"doc{i}", "contents": f'"Title {i}"\nPassage {i} about topic {i % 7}.'} for i in range(N_PASSAGES)
        ]
        if not self.corpus_path.exists():
            self.corpus_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.rows = rows
        self.vectors = np.stack([HashEncoder.vec(r["contents"]) for r in rows])

    def app(self, encoder: HashEncoder | None = None, **kwargs):
        from helpers import server_kwargs

        from searchr1.retrieval.corpus import CorpusStore
        from searchr1.retrieval.server import create_app

        return create_app(
            CorpusStore(self.corpus_path),
            encoder or HashEncoder(),
            NumpyBackend(self.vectors),
            **server_kwargs(**kwargs),
        )

    def expected(self, query: str, k: int) -> list[dict]:
        ids = np.argsort(-(self.vectors @ HashEncoder.vec(query)), kind="stable")[:k]
        return [self.rows[i] for i in ids]
