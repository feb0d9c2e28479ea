"""The toy policy: saved HF dir loads with the Auto classes (model AND word-level tokenizer) and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import model_size
from transformers import AutoModelForCausalLM, AutoTokenizer

from searchr1.prompt import make_messages
from searchr1.toy.model import count_parameters, make_model, write_model
from searchr1.toy.tokenizer import write_tokenizer
from searchr1.toy.world import WorldSizes, write_world

TINY = WorldSizes(n_couples=40, n_test_couples=8, n_rl_couples=12, test_per_split=5, rl_questions=20)
SIZE = model_size(hidden=64, layers=1, heads=2, intermediate=128)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("toy")
    write_world(5, root / "world", TINY)
    write_tokenizer(root / "world", root / "tok")
    write_model(root / "tok", root / "model", SIZE, seed=0)
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
        {tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")}
    )
    # the special ids are the chat markers', in the model config and the generation config alike
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>") != tok.unk_token_id
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.bos_token_id is None and model.generation_config.bos_token_id is None


def test_saved_weights_are_the_seeded_model_and_qwen2_shaped(dirs):
    tok_dir, model_dir = dirs
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    fresh = make_model(AutoTokenizer.from_pretrained(str(tok_dir)), SIZE, seed=0)  # the seed write_model was given
    saved, made = model.state_dict(), fresh.state_dict()
    assert saved.keys() == made.keys()
    assert all(torch.equal(saved[k], made[k]) for k in saved)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # Qwen2's q/k/v biases, present and trainable
        assert proj.bias is not None and proj.bias.requires_grad and proj.bias.shape == (SIZE.hidden,)
    assert attn.o_proj.bias is not None and not attn.o_proj.bias.any()  # Llama's extra one starts at zero
    assert all(p.bias is None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    # tied: the output projection is the embedding, so the logits are hidden states times the embedding
    ids = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        assert torch.allclose(out.logits, out.hidden_states[-1] @ model.get_input_embeddings().weight.T, atol=1e-5)
        again = AutoModelForCausalLM.from_pretrained(str(model_dir))(input_ids=ids).logits
    assert torch.equal(out.logits, again)  # loading and the forward pass are deterministic


def test_model_generates(dirs):
    _, model_dir = dirs
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor([tok.encode("where was", add_special_tokens=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out.shape == (1, ids.shape[1] + 4)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    # greedy: each new token is the argmax of the logits over everything before it
    with torch.no_grad():
        logits = model(input_ids=out).logits[0]
    n = ids.shape[1]
    assert out[0, n:].tolist() == logits[n - 1 : -1].argmax(-1).tolist()


def test_default_size_is_the_toy_config_size(dirs):
    tok = AutoTokenizer.from_pretrained(str(dirs[0]))
    model = make_model(tok, model_size(), seed=0)  # the toy config's: hidden 256, 2 layers, 4 heads, intermediate 512
    n = count_parameters(model)
    assert 1.2e6 < n < 1.8e6, n  # ~1.5M at a ~600-word vocabulary
    assert (
        model.config.hidden_size,
        model.config.num_hidden_layers,
        model.config.num_attention_heads,
        model.config.intermediate_size,
    ) == (256, 2, 4, 512)


def test_same_seed_same_weights(dirs):
    tok = AutoTokenizer.from_pretrained(str(dirs[0]))
    size = model_size(hidden=32, layers=1, heads=2, intermediate=64)
    a, b, c = make_model(tok, size, seed=1), make_model(tok, size, seed=1), make_model(tok, size, seed=2)
    sa, sb, sc = (dict(m.named_parameters()) for m in (a, b, c))  # a tied tensor once
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    random_init = [k for k in sa if sa[k].ndim == 2]  # the embedding and the projections
    assert len(random_init) == 1 + 4 + 3  # embed; q, k, v, o; gate, up, down (the head is the tied embedding)
    assert all(not torch.equal(sa[k], sc[k]) for k in random_init)


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="multiple of heads"):
        model_size(hidden=100, heads=3).validate()
