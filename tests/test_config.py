"""Config validation: the shipped configs pass, and each kind of mistake is named in the error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from searchr1.config import ConfigError, deep_merge, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full() -> dict:
    return load_config(ROOT / "config.yaml")


def test_shipped_configs_are_valid(full):
    toy = load_config(ROOT / "config.yaml", ROOT / "config.toy.yaml")
    assert full["scale"] == "full" and toy["scale"] == "toy"
    # The toy config overrides sizes and scale-dependent sources only; the recipe's shape stays.
    assert toy["agent"] == full["agent"] and toy["retriever"]["topk"] == full["retriever"]["topk"]


def test_seed_recipe_values(full):
    t = full["train"]
    assert (t["num_rollout"], t["rollout_batch_size"], t["n_samples_per_prompt"], t["global_batch_size"]) == (
        3000,
        32,
        8,
        256,
    )
    assert (t["rollout_max_response_len"], t["rollout_temperature"], t["lr"], t["weight_decay"]) == (
        512,
        1.0,
        1e-6,
        0.01,
    )
    assert (t["adam_beta1"], t["adam_beta2"], t["kl_loss_coef"], t["kl_loss_type"]) == (0.9, 0.98, 1e-3, "low_var_kl")
    assert (t["eps_clip"], t["eps_clip_high"], t["entropy_coef"], t["use_tis"]) == (0.2, 0.28, 0.0, True)
    s = t["slime"]
    assert (s["gpus_per_node"], s["tensor_model_parallel_size"], s["rollout_num_gpus_per_engine"]) == (4, 2, 2)
    assert (s["sglang_mem_fraction_static"], s["max_tokens_per_gpu"], s["colocate"]) == (0.7, 9216, True)
    assert full["retriever"]["topk"] == 3 and full["agent"]["max_turns"] == 2
    assert full["eval"]["temperature"] == 0 and full["eval"]["n_samples"] == 1
    # the seed's two splits with their checked counts; the other five Search-R1 benchmarks are unchecked (null)
    rows = {k: v["expected_rows"] for k, v in full["data"]["splits"].items()}
    assert (rows.pop("nq_test"), rows.pop("hotpotqa_test")) == (3610, 7405) and set(rows.values()) == {None}
    assert full["published"] == {
        "base": {"nq_test": 0.1620, "hotpotqa_test": 0.0984},
        "rl": {"nq_test": 0.4576, "hotpotqa_test": 0.3381},
    }
    assert full["policy"]["repo"] == "Qwen/Qwen2.5-3B"


BAD = [
    ("misspelled key", {"train": {"n_sample_per_prompt": 8}}, "train.n_sample_per_prompt': unknown key"),
    ("misspelled top-level key", {"retreiver": {}}, "'retreiver': unknown key"),
    ("wrong type", {"retriever": {"topk": "3"}}, "retriever.topk"),
    ("impossible value", {"train": {"lr": -1.0}}, "train.lr"),
    ("bad enum", {"train": {"backend": "verl"}}, "train.backend"),
    ("batch not divisible", {"train": {"global_batch_size": 100}}, "train.global_batch_size': 100 does not divide"),
    ("clip-high below clip", {"train": {"eps_clip_high": 0.1}}, "train.eps_clip_high"),
    ("topk above max", {"retriever": {"topk": 80}}, "retriever.topk': 80 exceeds"),
    ("unknown eval split", {"eval": {"splits": ["nq_test", "triviaqa"]}}, "eval.splits': split 'triviaqa'"),
    ("slime older than v0.3.1", {"train": {"slime": {"version": "v0.3.0"}}}, "train.slime.version"),
    (
        "tensor parallel does not divide GPUs",
        {"train": {"slime": {"tensor_model_parallel_size": 3}}},
        "tensor_model_parallel_size",
    ),
    ("bad url", {"retriever": {"url": "localhost:8000"}}, "retriever.url"),
]


@pytest.mark.parametrize("what,override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(full, what, override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(deep_merge(full, override))
    assert message in str(err.value)


def test_missing_required_key_is_named(full):
    cfg = copy.deepcopy(full)
    del cfg["train"]["lr"]
    with pytest.raises(ConfigError, match="'train'.*'lr' is a required property"):
        validate_config(cfg)


def test_every_problem_is_reported_at_once(full):
    with pytest.raises(ConfigError) as err:
        validate_config(deep_merge(full, {"train": {"lrr": 1}, "retriever": {"topk": "x"}}))
    assert "train.lrr" in str(err.value) and "retriever.topk" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(bad)
