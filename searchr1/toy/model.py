"""The toy policy: a tiny Qwen2-style decoder (tied embeddings) sized to the toy tokenizer.

Why the class is LlamaForCausalLM and not Qwen2ForCausalLM: transformers 5.23 hard-wires
`AutoTokenizer` for `model_type == "qwen2"` to Qwen2Tokenizer, which rebuilds a byte-level BPE from the
vocabulary and throws away our word-level tokenizer.json (every word became one unknown byte token). A
checkpoint whose tokenizer only loads right through a special call would break every consumer that uses
`AutoTokenizer.from_pretrained(model_dir)`. Llama with `attention_bias=True` is the Qwen2 block (RMSNorm,
RoPE, SwiGLU, q/k/v biases) plus a zero-initialised bias on the output projection, and its model type
leaves the tokenizer class to tokenizer_config.json (TokenizersBackend).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from searchr1.config import FromConfig


@dataclass
class ToyModelSize(FromConfig):
    # From the config (toy.model.*): no defaults here.
    hidden: int
    layers: int
    heads: int
    intermediate: int
    # Not a config key: longer than any toy trajectory.
    max_positions: int = 2048

    CONFIG_KEYS: ClassVar[dict[str, str]] = {
        "hidden": "toy.model.hidden",
        "layers": "toy.model.layers",
        "heads": "toy.model.heads",
        "intermediate": "toy.model.intermediate",
    }

    def validate(self) -> None:
        for name in ("hidden", "layers", "heads", "intermediate", "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model size {name} must be > 0, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")


def make_model(tokenizer, size: ToyModelSize, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model whose vocabulary and special ids match ``tokenizer``."""
    size.validate()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=True,
        attention_bias=True,  # Qwen2 has q/k/v biases
        mlp_bias=False,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)  # initialisation draws from the global generator
    return LlamaForCausalLM(config)


def eos_token_ids(tokenizer) -> list[int]:
    """Ids that end a generation: <|im_end|> (the chat turn end) and <|endoftext|>."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})


def write_model(tokenizer_dir: str | Path, out_dir: str | Path, size: ToyModelSize, seed: int) -> LlamaForCausalLM:
    """Create the model and save it with its tokenizer and generation config (safetensors)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = make_model(tokenizer, size, seed)
    eos = eos_token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model


def count_parameters(model: torch.nn.Module) -> int:
    # Tied weights are one tensor; `parameters()` yields each shared tensor once.
    return sum(p.numel() for p in model.parameters())
