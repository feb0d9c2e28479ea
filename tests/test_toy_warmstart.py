"""The warm start: demos in the agent's exact protocol, loss only on model-written tokens, loss goes down."""

from __future__ import annotations

import json
import random

import pytest
from helpers import model_size, warm_start_config
from transformers import AutoTokenizer

from searchr1.agent import observation_text, parse_action
from searchr1.prompt import make_messages
from searchr1.reward import em_score
from searchr1.toy.model import write_model
from searchr1.toy.tokenizer import write_tokenizer
from searchr1.toy.warmstart import (
    PASSAGE,
    TARGET,
    Demo,
    TokenizedDemo,
    collate,
    make_demos,
    masked_lm_loss,
    query_for,
    shared_prefix_length,
    shared_prefix_loss,
    tokenize_demo,
    warm_start,
)
from searchr1.toy.world import (
    SINGLE_HOP_TEMPLATES,
    TWO_HOP_TEMPLATES,
    WorldSizes,
    load_world,
    make_question,
    write_world,
)

TINY = WorldSizes(n_couples=40, n_test_couples=8, n_rl_couples=12, test_per_split=5, rl_questions=20)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_world(11, root / "world", TINY)
    write_tokenizer(root / "world", root / "tok")
    write_model(root / "tok", root / "model", model_size(hidden=64, layers=1, heads=2, intermediate=128), seed=0)
    world = load_world(root / "world")
    rows = [json.loads(line) for line in (root / "world/corpus.jsonl").read_text().splitlines()]
    return root, world, rows, AutoTokenizer.from_pretrained(str(root / "model"))


def gold_first_retriever(world, rows, calls: list):
    """Returns the passages of the people named in the query, then a test person's and other passages."""
    by_name = {r["contents"].split("\n")[0].strip('"').lower(): r for r in rows}
    test_person = world.couple_members(world.splits["test"][0])[0]
    test_row = rows[int(world.people[test_person].passage_id)]

    def retrieve(queries, topk):
        calls.append((list(queries), topk))
        out = []
        for q in queries:
            names = q.split(" born in ")[0]  # a two-entity query ends with its constraint
            gold = [by_name[n] for n in names.split(" and ") if n in by_name]
            others = [r for r in rows if r not in gold][:topk]
            out.append((gold[:1] + [test_row] + gold[1:] + others)[:topk])
        return out

    return retrieve


def test_demos_follow_the_protocol_and_mask(toy):
    root, world, rows, tok = toy
    calls = []
    cfg = warm_start_config(n_demos=300, decision_fraction=0.3, seed=1)
    demos, dropped = make_demos(world, tok, gold_first_retriever(world, rows, calls), cfg)
    assert dropped == 0 and len(demos) == 300
    assert len(calls) == 1 and calls[0][1] == cfg.topk + cfg.retrieve_extra  # one batched retriever call
    kinds = {d.kind for d in demos}
    assert kinds == {"search", "decide_answer", "decide_search", "decide_invalid"}
    warm = set(world.splits["warmstart"])
    warm_ids = {world.people[m].passage_id for c in warm for m in world.couple_members(c)}
    for demo in demos:
        assert demo.question.couple in warm  # only warm-start couples' facts
        t = tokenize_demo(tok, demo)
        assert t.input_ids[: t.n_prompt] == tok.encode(demo.prompt_text, add_special_tokens=False)
        assert not any(t.loss_mask[: t.n_prompt])
        # The loss covers exactly the model-written segments.
        expected = [m for text, m in demo.segments for _ in tok.encode(text, add_special_tokens=False)]
        assert t.loss_mask[t.n_prompt :] == expected
        assert t.input_ids[t.n_prompt :] == [
            i for text, _ in demo.segments for i in tok.encode(text, add_special_tokens=False)
        ]
        first_turn = demo.segments[0][0]
        assert first_turn.startswith("<think>") and first_turn.strip().endswith("</think>")
        decision_text, decision_mask = demo.segments[1]
        if demo.kind == "decide_invalid":
            assert parse_action(demo.response_text)[0] is None
            assert demo.segments[-1][0] == tok.eos_token
            continue
        assert decision_text in ("<search>", "<answer>") and len(tok.encode(decision_text)) == 1
        assert decision_mask == (0 if demo.kind == "search" else 1)
        if demo.kind == "decide_answer":
            assert decision_text == "<answer>"
            continue
        assert decision_text == "<search>"
        obs_text, obs_mask = demo.segments[3]
        assert obs_mask == PASSAGE and obs_text.startswith('\n\n<information>Doc 1(Title: "')
        ids_in_obs = {r["id"] for r in rows if r["contents"].split("\n", 1)[1] in obs_text}
        assert ids_in_obs <= warm_ids and len(ids_in_obs) == cfg.topk  # the test person was filtered out
        # The final answer is right under the faithful EM of prompt + response.
        assert em_score(demo.prompt_text + demo.response_text, [demo.question.answer]) == 1.0
        answer_turn = demo.segments[4][0]
        assert answer_turn.startswith("<think> ") and f"<answer> {demo.question.answer} </answer>" in answer_turn
        # The restated evidence is copied from the observation, sentence by sentence (so reading is copying).
        evidence = answer_turn.removeprefix("<think> ").split(" </think>")[0]
        for sentence in evidence.split(". "):
            assert sentence in obs_text, (demo.question.template, sentence)
        assert demo.question.answer in evidence


def test_query_names_the_people_and_a_two_entity_constraint(toy):
    """Single-hop: the person's name. Two-entity: both names, then the question's own "born in C" (the city
    of the person the question picks, so that person's passage ranks first)."""
    root, world, rows, tok = toy
    rng = random.Random(0)
    for couple in world.splits["warmstart"][:5]:
        for template in SINGLE_HOP_TEMPLATES:
            q = make_question(world, couple, template, rng)
            assert query_for(world, q) == q.names[0]
        for template in TWO_HOP_TEMPLATES:
            q = make_question(world, couple, template, rng)
            city = q.question.rsplit(" born in ", 1)[1]
            assert query_for(world, q) == f"{q.names[0]} and {q.names[1]} born in {city}"
            born_there = [m for m in world.couple_members(couple) if world.people[m].city == city]
            assert born_there == [q.subject]


def test_a_word_outside_the_vocabulary_is_an_error_naming_the_demo(toy):
    root, world, rows, tok = toy
    q = make_question(world, world.splits["warmstart"][0], "born", random.Random(0))
    good = Demo("<think> answer </think>", [(" <answer> paris </answer>", TARGET)], "decide_answer", q)
    bad = Demo("<think> answer </think>", [(" <answer> xylophonist </answer>", TARGET)], "decide_answer", q)
    tokenize_demo(tok, good)
    with pytest.raises(ValueError, match="1 word.*outside the tokenizer's vocabulary.*xylophonist"):
        tokenize_demo(tok, bad)


def test_observation_is_rendered_exactly_as_the_agent(toy):
    root, world, rows, tok = toy
    calls = []
    demos, _ = make_demos(world, tok, gold_first_retriever(world, rows, calls), warm_start_config(n_demos=20))
    demo = next(d for d in demos if d.kind == "search")
    query = demo.segments[2][0].replace("</search>", "").strip()
    hits = [
        r
        for r in gold_first_retriever(world, rows, [])([query], 8)[0]
        if r["id"] in {world.people[m].passage_id for c in world.splits["warmstart"] for m in world.couple_members(c)}
    ][:3]
    assert demo.segments[3][0] == observation_text(hits)


def test_missed_gold_passage_drops_the_demo(toy):
    root, world, rows, tok = toy

    def useless(queries, topk):
        return [rows[-topk:] for _ in queries]

    cfg = warm_start_config(n_demos=50, decision_fraction=0.0)
    demos, dropped = make_demos(world, tok, useless, cfg)
    assert dropped + len(demos) == 50 and dropped >= 45


def test_warm_start_lowers_the_loss_and_saves_a_loadable_base(toy):
    root, world, rows, tok = toy
    cfg = warm_start_config(steps=30, batch_size=8, lr=3e-3, n_demos=200, log_every=5, warmup_steps=3, seed=2)
    messages = []
    result = warm_start(
        root / "model", world, gold_first_retriever(world, rows, []), root / "base", cfg, messages.append
    )
    losses = [e["loss"] for e in result.loss_log]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    saved = json.loads((root / "base/warmstart.json").read_text())
    assert saved["steps"] == 30 and saved["final_loss"] == pytest.approx(losses[-1]) and saved["time_s"] > 0
    assert any("step 30/30" in m for m in messages)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    assert AutoTokenizer.from_pretrained(str(root / "base")).encode("where") == tok.encode("where")
    assert base.config.vocab_size == len(tok)


def test_warm_start_is_deterministic(toy):
    root, world, rows, tok = toy
    cfg = warm_start_config(steps=3, batch_size=4, n_demos=30, log_every=1, seed=5)
    a = warm_start(root / "model", world, gold_first_retriever(world, rows, []), root / "a", cfg)
    b = warm_start(root / "model", world, gold_first_retriever(world, rows, []), root / "b", cfg)
    assert [e["loss"] for e in a.loss_log] == [e["loss"] for e in b.loss_log]
    assert (root / "a/model.safetensors").read_bytes() == (root / "b/model.safetensors").read_bytes()


def test_shared_prefix_loss_equals_the_full_forward(toy):
    """Running the common instruction prefix once and repeating its cache gives the full forward's loss and
    gradients (fp32), on a batch of demos of different lengths (right padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    root, world, rows, tok = toy
    demos, _ = make_demos(world, tok, gold_first_retriever(world, rows, []), warm_start_config(n_demos=40, seed=3))
    batch = [tokenize_demo(tok, d) for d in demos][:6]
    assert len({len(d.input_ids) for d in batch}) > 1
    prefix = shared_prefix_length(batch)
    instruction = tok.encode(tok.apply_chat_template(make_messages("who"), tokenize=False), add_special_tokens=False)
    assert 50 < prefix < min(d.n_prompt for d in batch)
    assert batch[0].input_ids[:prefix] == instruction[:prefix]  # the chat template and instruction text
    model = AutoModelForCausalLM.from_pretrained(str(root / "model"), dtype=torch.float32)

    def loss_and_grads(compute):
        model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    full, full_grads = loss_and_grads(lambda: masked_lm_loss(model, *collate(batch, tok.pad_token_id), False))
    shared, shared_grads = loss_and_grads(lambda: shared_prefix_loss(model, batch, prefix, tok.pad_token_id, False))
    assert shared == pytest.approx(full, rel=1e-6)
    for a, b in zip(full_grads, shared_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the prefix's own parameters get gradient only through the repeated cache: it must not be zero
    assert model.model.embed_tokens.weight.grad[batch[0].input_ids[0]].abs().sum() > 0


def test_shared_prefix_stays_inside_every_prompt():
    a = TokenizedDemo([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1], n_prompt=4)
    b = TokenizedDemo([1, 2, 3, 9, 5], [0, 0, 0, 0, 1], n_prompt=4)
    assert shared_prefix_length([a, b]) == 3
    assert shared_prefix_length([a, TokenizedDemo([1, 2, 3, 4, 7], [0, 0, 1, 1, 1], n_prompt=2)]) == 1
    assert shared_prefix_length([a, TokenizedDemo([8, 2], [0, 1], n_prompt=1)]) == 0
    with pytest.raises(ValueError, match="same 3 prompt tokens"):
        shared_prefix_loss(None, [a, TokenizedDemo([1, 2, 7, 4, 5], [0, 0, 0, 0, 1], n_prompt=4)], 3, 0, False)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="decision_answer"):
        warm_start_config(decision_answer=0.9, decision_search=0.2).validate()


def test_passage_loss_is_added_as_its_own_mean(toy):
    """passage_weight w: mean CE over model-written tokens + w x mean CE over the passages' tokens, each by
    hand from the full logits (with w = 0 the passages cost nothing, not even the head)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    root, world, rows, tok = toy
    demos, _ = make_demos(world, tok, gold_first_retriever(world, rows, []), warm_start_config(n_demos=30, seed=4))
    batch = [tokenize_demo(tok, d) for d in demos if d.kind == "search"][:4]
    model = AutoModelForCausalLM.from_pretrained(str(root / "model"), dtype=torch.float32)
    ids, attn, mask = collate(batch, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        kinds = mask[:, 1:].reshape(-1)
        target_mean, passage_mean = ce[kinds == TARGET].mean(), ce[kinds == PASSAGE].mean()
        assert (kinds == PASSAGE).sum() > 2 * (kinds == TARGET).sum()  # passages are most of a search demo
        assert masked_lm_loss(model, ids, attn, mask, False).item() == pytest.approx(target_mean.item(), rel=1e-5)
        with_passages = masked_lm_loss(model, ids, attn, mask, False, passage_weight=0.5).item()
        assert with_passages == pytest.approx(target_mean.item() + 0.5 * passage_mean.item(), rel=1e-5)
