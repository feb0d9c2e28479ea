"""The toy policy: saved HF dir loads with the Auto classes (model AND word-level tokenizer) and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import model_size
from searchr1.prompt import make_messages
from searchr1.toy.model import ToyModelSize, count_parameters, make_model, write_model
from searchr1.toy.tokenizer import write_tokenizer
from searchr1.toy.world import WorldSizes, write_world

TINY = WorldSizes(n_couples=40, n_test_couples=8, n_rl_couples=12, test_per_split=5, rl_questions=20)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("toy")
    write_world(5, root / "world", TINY)
    write_tokenizer(root / "world", root / "tok")
    write_model(root / "tok", root / "model", model_size(hidden=64, layers=1, heads=2, intermediate=128))
    return root / "tok", root / "model"


def test_model_dir_loads_and_tokenizer_is_ours(dirs):
    tok_dir, model_dir = dirs
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ref = AutoTokenizer.from_pretrained(str(tok_dir))
    # A qwen2 model type would make AutoTokenizer rebuild a byte-level BPE here (see searchr1.toy.model).
    text = ref.apply_chat_template(make_messages("where was x born"), tokenize=False, add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert len(tok) == ref.__len__() == model.config.vocab_size
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert model.dtype == torch.float32
    assert sorted(model.generation_config.eos_token_id) == sorted(
        {tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")})


def test_model_generates(dirs):
    _, model_dir = dirs
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor([tok.encode("where was", add_special_tokens=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         eos_token_id=None)
    assert out.shape == (1, ids.shape[1] + 4)
    assert int(out.max()) < len(tok)


def test_default_size_is_the_prototype_size(dirs):
    tok = AutoTokenizer.from_pretrained(str(dirs[0]))
    model = make_model(tok, model_size())  # the toy config's: hidden 256, 2 layers, 4 heads, intermediate 1024
    n = count_parameters(model)
    assert 1.6e6 < n < 2.6e6, n  # ~2.25M at a ~600-word vocabulary
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads,
            model.config.intermediate_size) == (256, 2, 4, 1024)


def test_same_seed_same_weights(dirs):
    tok = AutoTokenizer.from_pretrained(str(dirs[0]))
    size = model_size(hidden=32, layers=1, heads=2, intermediate=64)
    a, b, c = make_model(tok, size, seed=1), make_model(tok, size, seed=1), make_model(tok, size, seed=2)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="multiple of heads"):
        model_size(hidden=100, heads=3).validate()
