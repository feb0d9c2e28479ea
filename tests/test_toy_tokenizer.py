"""The toy tokenizer: Qwen chat template, special vs protocol tokens, round trip, vocabulary coverage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from searchr1.agent import INVALID_ACTION_TEXT, observation_text
from searchr1.prompt import make_messages, make_prompt
from searchr1.toy.tokenizer import PROTOCOL_TAGS, write_tokenizer
from searchr1.toy.world import WorldSizes, write_world

TINY = WorldSizes(n_couples=40, n_test_couples=8, n_rl_couples=12, test_per_split=5, rl_questions=20)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(3, out, TINY)
    return out


@pytest.fixture(scope="module")
def tok(world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(world_dir, out)
    return AutoTokenizer.from_pretrained(str(out))


def test_chat_template_is_qwen_format(tok):
    q = "where was Ann Smith born"
    text = tok.apply_chat_template(make_messages(q), tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{make_prompt(q)}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tok.all_special_ids
    assert tok.encode("where", add_special_tokens=True) == tok.encode("where", add_special_tokens=False)


def test_protocol_tags_are_single_non_special_tokens(tok):
    for tag in PROTOCOL_TAGS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] not in tok.all_special_ids, tag
    # A tag glued to other text is still its own token, and decoding keeps it.
    ids = tok.encode(
        "<|im_start|>assistant\n<think>born</think><answer>where</answer><|im_end|>", add_special_tokens=False
    )
    assert tok.decode(ids, skip_special_tokens=True) == "assistant <think> born </think> <answer> where </answer>"


def test_round_trip_of_protocol_text(tok, world_dir):
    row = json.loads((world_dir / "corpus.jsonl").read_text().splitlines()[0])
    name = row["contents"].split("\n")[0].strip('"')
    response = (
        f"<think> about {name} </think> <search> {name} </search>"
        + observation_text([row])
        + f"<think> {name} was born in x </think> <answer> {name} </answer>"
        + INVALID_ACTION_TEXT
    )
    ids = tok.encode(response, add_special_tokens=False)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert tok.unk_token_id not in ids
    assert tok.encode(decoded, add_special_tokens=False) == ids  # ids are stable through text
    # Word level: the text comes back lower-cased, one space between words and punctuation marks.
    words = decoded.split(" ")
    assert "".join(words) == "".join(response.lower().split())
    assert "<information>" in decoded and f"<answer> {name.lower()} </answer>" in decoded


def test_world_and_prompt_have_no_unknown_words(tok, world_dir):
    import pandas as pd

    for line in (world_dir / "corpus.jsonl").read_text().splitlines():
        assert tok.unk_token_id not in tok.encode(json.loads(line)["contents"], add_special_tokens=False)
    for split in ("train", "test"):
        for q in pd.read_parquet(world_dir / f"{split}.parquet")["question"]:
            text = tok.apply_chat_template(make_messages(q), tokenize=False, add_generation_prompt=True)
            assert tok.unk_token_id not in tok.encode(text, add_special_tokens=False), q
    assert tok.encode("zyzzyva", add_special_tokens=False) == [tok.unk_token_id]


def test_tokenizer_bytes_are_deterministic(world_dir, tmp_path):
    write_tokenizer(world_dir, tmp_path / "a")
    write_tokenizer(world_dir, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
