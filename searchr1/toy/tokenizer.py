"""A word-level tokenizer for the toy world, saved as a transformers fast tokenizer with Qwen's chat format.

Word level (one token per lower-cased word or punctuation mark) keeps the vocabulary at a few hundred
tokens, so a 2M-parameter model can copy a name or a city as a single token. The chat markers are special
tokens (one id each, dropped by `decode(skip_special_tokens=True)`); the protocol tags are added tokens
that are NOT special, because the agent parses them from decoded text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from searchr1.agent import INVALID_ACTION_TEXT
from searchr1.prompt import SEARCH_R1_INSTRUCTION

IM_START, IM_END, END_OF_TEXT, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, UNK)
PROTOCOL_TAGS = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<information>",
    "</information>",
    "<answer>",
    "</answer>",
)
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2.5's format for a conversation without tools: a default system turn, then each message, then the
# assistant header when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{%- set rest = messages %}"
    "{%- endif %}"
    "{%- for message in rest %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Text the agent and the warm start write around the model's words (as vocabulary only).
PROTOCOL_TEXTS = (
    SEARCH_R1_INSTRUCTION,
    "Question: ?",
    f"system user assistant {DEFAULT_SYSTEM}",
    'Doc 1(Title: "x") Doc 2 Doc 3 Doc 4 Doc 5 Doc 6 Doc 7 Doc 8 Doc 9 Doc 10',
    INVALID_ACTION_TEXT,
    # Words of the warm-start demonstrations (searchr1.toy.warmstart).
    "the question is about , . where who what among and",
)


def make_normalizer() -> normalizers.Normalizer:
    return normalizers.Lowercase()


def make_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Every punctuation mark is its own token, so '"Miami").' is four tokens, all in the vocabulary.
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])


def world_texts(world_dir: str | Path) -> list[str]:
    """All text the toy model will see from the world: passages and questions of both splits."""
    world_dir = Path(world_dir)
    texts = []
    with open(world_dir / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["contents"])
    for split in ("train", "test"):
        df = pd.read_parquet(world_dir / f"{split}.parquet", columns=["question", "golden_answers"])
        texts.extend(df["question"].tolist())
        texts.extend(a for answers in df["golden_answers"] for a in answers)
    return texts


def build_vocab(texts: list[str]) -> list[str]:
    """The sorted set of words (after normalisation and pre-tokenisation) of ``texts``."""
    normalizer, pre_tokenizer = make_normalizer(), make_pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            words.add(word)
    return sorted(words)  # sorted: ids must not depend on set order


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``texts`` plus the protocol vocabulary."""
    words = build_vocab(list(texts) + list(PROTOCOL_TEXTS))
    vocab: dict[str, int] = {}
    for token in list(SPECIAL_TOKENS) + list(PROTOCOL_TAGS) + words:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = make_normalizer()
    core.pre_tokenizer = make_pre_tokenizer()
    # Words are joined with single spaces on decode; tags are ordinary words for the decoder.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TAGS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=UNK,
        bos_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_tokenizer(world_dir: str | Path, out_dir: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer(world_texts(world_dir))
    tok.save_pretrained(str(out_dir))
    return tok
