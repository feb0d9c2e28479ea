"""End-to-end runs of the local GRPO trainer on a tiny Qwen2 model: learning step, kill and resume."""

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from helpers import FakeRetriever, grpo_settings
from searchr1.grpo import GRPOSettings, train_grpo
from searchr1.grpo.checkpoint import list_checkpoints
from searchr1.prompt import SEARCH_R1_INSTRUCTION, make_messages

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TAGS = ["<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>"]
QUESTIONS = [("where was ada born", "paris"), ("what is bob's job", "baker"), ("who is cy married to", "dee"),
             ("where was dee born", "rome")]
TIMING_KEYS = {"wall_time_s", "rollout_time_s"}
# SEARCHR1_TEST_DEVICE=cuda runs the same tests on a GPU (the backend must work on one GPU too).
DEVICE = os.environ.get("SEARCHR1_TEST_DEVICE", "cpu")


def scripted_retriever() -> FakeRetriever:
    """Hits that depend only on the query text (the real retriever's ranking is not what this test checks)."""
    return FakeRetriever(lambda q: [{"id": str(k), "contents": f'"{q or "x"}"\n{q} paris baker dee rome'} for k in range(8)])


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_world")
    words = set()
    split = pre_tokenizers.Whitespace()
    for text in [SEARCH_R1_INSTRUCTION, "system user assistant You are a helpful assistant Question ?",
                 "Doc Title ( ) My previous action is invalid"] + [q + " " + a for q, a in QUESTIONS]:
        words.update(w for w, _ in split.pre_tokenize_str(text))
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {tok: i for i, tok in enumerate(special + TAGS + sorted(words - set(TAGS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = split
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.add_tokens(TAGS)  # not special: decode(skip_special_tokens=True) keeps them
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    # A few steps of supervised warm start so that sampled rollouts search, answer right and wrong,
    # and stop at tags (an untrained model only emits noise and never exercises the retriever).
    demos = ["<search> ada born </search>", "<answer> paris </answer>", "<answer> rome </answer>",
             "<think> ada </think> <search> bob </search>"]
    prompt = tok.apply_chat_template(make_messages(QUESTIONS[0][0]), tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        demo_ids = tok.encode(demos[step % len(demos)], add_special_tokens=False)
        ids = torch.tensor([prompt_ids + demo_ids])
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids):])
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy = root / "policy"
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    rows = [{
        "data_source": "nq", "prompt": make_messages(q), "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": [a, "beijing"]}},
        "extra_info": {"split": "train", "index": i}, "question": q, "id": f"t{i}",
    } for i, (q, a) in enumerate(QUESTIONS)]
    parquet = root / "train.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    return policy, parquet


def settings(**kw):
    base = dict(seed=3, num_rollout=5, rollout_batch_size=2, n_samples_per_prompt=4, global_batch_size=4,
                rollout_max_response_len=8, max_turns=2, topk=2, lr=5e-3, checkpoint_interval=2,
                micro_batch_size=3, bf16_autocast=False, device=DEVICE, use_tis=True, eval_interval=1)
    base.update(kw)
    return grpo_settings(**base)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def run(world, out: Path, s: GRPOSettings, hook=None):
    policy, parquet = world
    return train_grpo(policy_dir=policy, train_parquet=parquet, work_dir=out / "work", metrics_path=out / "metrics.jsonl",
                      export_dir=out / "export", retriever_url=None, settings=s, eval_hook=hook,
                      retriever=scripted_retriever())


class Killed(RuntimeError):
    pass


def test_killed_run_resumes_to_identical_metrics_and_weights(tiny_world, tmp_path):
    s = settings()
    full = run(tiny_world, tmp_path / "full", s)
    assert full["resumed_from"] is None
    ref = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in ref] == list(range(5))
    for key in ("reward_mean", "response_len_mean", "searches_mean", "em_mean", "wall_time_s", "kl", "pg_loss",
                "clipfrac", "entropy", "grad_norm", "search_rate", "retrieval_failures", "tis"):
        assert all(key in r for r in ref), key
    assert all(math.isfinite(r["pg_loss"]) and math.isfinite(r["grad_norm"]) for r in ref)
    assert any(r["searches_mean"] > 0 for r in ref)  # the retriever path ran
    # A learning signal: some steps hold a group whose rewards differ (nonzero advantages), and exactly those
    # steps carry a policy gradient; a step whose groups all have equal rewards has pg_loss 0 and only the
    # KL term's tiny gradient (the policy is still next to the reference).
    groups = s.rollout_batch_size
    assert all(r["zero_std_group_frac"] * groups == round(r["zero_std_group_frac"] * groups) for r in ref)
    signal = [r for r in ref if r["zero_std_group_frac"] < 1]
    assert signal and len(signal) < len(ref), [r["zero_std_group_frac"] for r in ref]
    for r in ref:
        if r["zero_std_group_frac"] < 1:
            assert r["reward_mean"] > 0 and r["grad_norm"] > 0.1, r
        else:
            assert r["pg_loss"] == 0.0 and 0 < r["grad_norm"] < 0.01, r

    def kill_at_step_2(step, model, tokenizer):  # after metrics line 2, past the checkpoint of 2 steps
        if step == 2:
            raise Killed()

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(tiny_world, out, s, hook=kill_at_step_2)
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    assert [n for n, _ in list_checkpoints(out / "work")] == [2]
    resumed = run(tiny_world, out, s)
    assert resumed["resumed_from"] == 2
    got = read_metrics(out / "metrics.jsonl")
    assert without_timing(got) == without_timing(ref)
    assert [n for n, _ in list_checkpoints(out / "work")] == [4, 5]  # keep last 2
    w_full = load_file(tmp_path / "full" / "export" / "model.safetensors")
    w_res = load_file(out / "export" / "model.safetensors")
    assert w_full.keys() == w_res.keys()
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    # the policy moved away from the base
    w_base = load_file(tiny_world[0] / "model.safetensors")
    assert any(not torch.equal(w_base[k], w_full[k]) for k in w_base)
    assert (tmp_path / "full" / "export" / "tokenizer.json").is_file()
    # rerun of a finished run: nothing to train, same metrics, export rewritten
    again = run(tiny_world, out, s)
    assert again["resumed_from"] == 5
    assert without_timing(read_metrics(out / "metrics.jsonl")) == without_timing(ref)


def test_single_optimizer_step_is_on_policy_and_eval_hook_runs(tiny_world, tmp_path):
    calls = []
    s = settings(num_rollout=2, global_batch_size=8, checkpoint_interval=5, eval_interval=1, use_tis=False)
    run(tiny_world, tmp_path, s, hook=lambda step, model, tok: calls.append(step))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert calls == [0, 1]
    for r in recs:  # one optimizer step per rollout: ratio is exactly 1 (old logprobs = current, detached)
        assert r["clipfrac"] == 0.0 and r["ppo_kl"] == 0.0
        assert "tis" not in r
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert [n for n, _ in list_checkpoints(tmp_path / "work")] == [2]  # the last step is always saved
