"""The GRPO objective against hand-computed values (slime's formulas, see searchr1.grpo.objective)."""

import math

import pytest
import torch
from helpers import objective_settings

from searchr1.grpo.objective import (
    approx_kl,
    clipped_policy_loss,
    group_advantages,
    grpo_loss,
    sum_of_sample_means,
    tis_weights,
)


def objective(**fields):
    """The recipe's objective settings (config.yaml) with TIS off unless a test turns it on."""
    return objective_settings(**{"use_tis": False, **fields})


def test_group_advantages_by_hand_including_zero_variance_group():
    # group 1: [1, 0, 0, 1] mean .5, unbiased std sqrt(1/3); group 2: all ones -> zeros
    adv = group_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], 4)
    std = math.sqrt((4 * 0.25) / 3)
    a = 0.5 / (std + 1e-6)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)


def test_group_advantages_without_std_and_groups_are_consecutive():
    adv = group_advantages([1.0, 0.0, 0.0, 0.0], 2, std_normalization=False)
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    adv = group_advantages([3.0], 1)
    assert adv.tolist() == [0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1.0, 0.0], 3)


def test_low_var_kl_value_and_clamp():
    lp = torch.tensor([-1.0, -2.0, 0.0])
    ref = torch.tensor([-1.5, -2.0, -20.0])
    kl = approx_kl(lp, ref, "low_var_kl")
    # k3: exp(ref - lp) - 1 - (ref - lp)
    assert kl[0].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5, abs=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    # ref far above lp: exp(20) - 1 - 20 clamps to 10
    kl_hi = approx_kl(torch.tensor([-20.0]), torch.tensor([0.0]), "low_var_kl")
    assert kl_hi.item() == 10.0
    assert approx_kl(torch.tensor([-20.0]), torch.tensor([0.0]), "k3").item() > 1e8  # k3 is not clamped
    # lp far above ref: exp(-20) - 1 + 20 = 19.0 also clamps to 10
    assert kl[2].item() == 10.0
    assert approx_kl(lp, ref, "k3")[2].item() == pytest.approx(math.exp(-20) - 1 + 20, rel=1e-6)
    assert approx_kl(lp, ref, "k1")[0].item() == pytest.approx(0.5)
    assert approx_kl(lp, ref, "k2")[0].item() == pytest.approx(0.125)
    with pytest.raises(ValueError, match="unknown kl_loss_type"):
        approx_kl(lp, ref, "kl")


def test_ppo_clip_both_sides():
    eps, eps_high = 0.2, 0.28
    old = torch.zeros(4)
    # ratios 1.5, 1.5, 0.5, 0.5 ; advantages +1, -1, +1, -1
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipfrac, ppo_kl = clipped_policy_loss(new, old, adv, eps, eps_high)
    # A>0, r>1+eh: clipped to -1.28 ; A<0, r>1+eh: -r*A=1.5 is larger -> unclipped
    # A>0, r<1-e: -0.5 larger than -0.8 -> unclipped ; A<0, r<1-e: 0.8 larger -> clipped
    assert torch.allclose(loss, torch.tensor([-1.28, 1.5, -0.5, 0.8]), atol=1e-6)
    assert clipfrac.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert torch.allclose(ppo_kl, -new)


def test_tis_truncation():
    train_old = torch.log(torch.tensor([3.0, 1.0, 0.5]))
    rollout = torch.zeros(3)
    w, ratio, clipped = tis_weights(train_old, rollout, clip_high=2.0, clip_low=0.0)
    assert torch.allclose(w, torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(ratio, torch.tensor([3.0, 1.0, 0.5]))
    assert clipped.tolist() == [1.0, 0.0, 0.0]
    w, _, clipped = tis_weights(train_old, rollout, clip_high=2.0, clip_low=0.8)
    assert torch.allclose(w, torch.tensor([2.0, 1.0, 0.8]))
    assert clipped.tolist() == [1.0, 0.0, 1.0]


def test_sum_of_sample_means_is_per_sample_mean():
    values = torch.tensor([1.0, 3.0, 10.0, 0.0, 0.0, 0.0])
    # sample 1: mean 2 over 2 tokens; sample 2: empty; sample 3: mean 10/4
    assert sum_of_sample_means(values, [2, 0, 4]).item() == pytest.approx(2.0 + 2.5)
    with pytest.raises(ValueError, match="sample lengths"):
        sum_of_sample_means(values, [2, 2])


def test_grpo_loss_aggregation_masking_kl_and_tis_by_hand():
    # two samples: 2 trained tokens and 1 trained token (observation tokens were dropped upstream)
    lp = torch.log(torch.tensor([0.5, 0.25, 0.8])).requires_grad_(True)
    old = lp.detach().clone()
    ref = torch.log(torch.tensor([0.4, 0.25, 0.8]))
    rollout = torch.log(torch.tensor([0.25, 0.25, 0.8]))  # TIS ratio 2, 1, 1 -> weights (clip 1.5) 1.5, 1, 1
    adv = torch.tensor([1.0, 1.0, -2.0])
    s = objective(kl_loss_coef=0.1, use_tis=True, tis_clip=1.5)
    loss, m = grpo_loss(
        log_probs=lp,
        old_log_probs=old,
        advantages=adv,
        sample_lengths=[2, 1],
        step_num_samples=4,
        settings=s,
        ref_log_probs=ref,
        rollout_log_probs=rollout,
    )
    # ratio 1 everywhere: pg per token = -A * w = [-1.5, -1, 2]; per-sample means: -1.25, 2
    pg = -1.25 + 2.0
    kl0 = math.exp(math.log(0.4) - math.log(0.5)) - 1 - (math.log(0.4) - math.log(0.5))
    kl = kl0 / 2
    assert m["pg_loss"] == pytest.approx(pg, abs=1e-6)
    assert m["kl"] == pytest.approx(kl, abs=1e-6)
    assert m["tis"] == pytest.approx((2 + 1) / 2 + 1, abs=1e-6)
    assert m["tis_clipfrac"] == pytest.approx(0.5)
    assert m["clipfrac"] == 0.0
    assert loss.item() == pytest.approx((pg + 0.1 * kl) / 4, abs=1e-6)
    loss.backward()
    # d/dlp of -w*A*exp(lp-old)/n_tokens/4 at ratio 1 = -w*A/(len*4): [-1.5/8, -1/8, 2/4] (+ KL grad on token 0)
    dkl0 = (1 - math.exp(math.log(0.4) - math.log(0.5))) / 2 * 0.1 / 4
    assert torch.allclose(lp.grad, torch.tensor([-1.5 / 8 + dkl0, -1 / 8, 2 / 4]), atol=1e-6)


def test_grpo_loss_entropy_term_and_requirements():
    lp = torch.zeros(2, requires_grad=True)
    ent = torch.tensor([1.0, 3.0], requires_grad=True)
    s = objective(use_kl_loss=False, entropy_coef=0.5)
    loss, m = grpo_loss(
        log_probs=lp,
        old_log_probs=lp.detach(),
        advantages=torch.zeros(2),
        sample_lengths=[2],
        step_num_samples=1,
        settings=s,
        entropy=ent,
    )
    assert m["entropy"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-0.5 * 2.0)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(
            log_probs=lp,
            old_log_probs=lp.detach(),
            advantages=torch.zeros(2),
            sample_lengths=[2],
            step_num_samples=1,
            settings=objective(),
        )
    with pytest.raises(ValueError, match="rollout"):
        grpo_loss(
            log_probs=lp,
            old_log_probs=lp.detach(),
            advantages=torch.zeros(2),
            sample_lengths=[2],
            step_num_samples=1,
            settings=objective(use_kl_loss=False, use_tis=True),
        )


def test_token_logprobs_with_a_shared_prompt_prefix_equal_one_forward_per_sequence():
    """token_logprobs runs the prefix all sequences share once (repeated key/value cache): every scored
    token's logprob, entropy and gradient equal those of each sequence run alone, at any scored position."""
    from helpers import tiny_model

    from searchr1.grpo.logprobs import TokenBatch, common_prefix_length, token_logprobs

    model = tiny_model(_word_tokenizer(), seed=3, sharpen=2.0)
    shared = [5, 9, 2, 7, 7, 3]
    sequences = [shared + [4, 8, 1, 6], shared + [4, 2], shared + [6, 6, 6, 1, 2, 9, 3]]
    positions = [[7, 8, 9], [7], [8, 10, 12]]
    assert common_prefix_length(sequences, 6) == 6 and common_prefix_length(sequences, 3) == 3
    batch = TokenBatch(sequences=sequences, positions=positions)

    def run(b):
        model.zero_grad(set_to_none=True)
        lp, ent = token_logprobs(model, b, temperature=0.7, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
        return lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    together = run(batch)
    alone = [run(TokenBatch(sequences=[s], positions=[p])) for s, p in zip(sequences, positions)]
    torch.testing.assert_close(together[0], torch.cat([a[0] for a in alone]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[1], torch.cat([a[1] for a in alone]), rtol=1e-5, atol=1e-6)
    for i, grad in enumerate(together[2]):
        torch.testing.assert_close(grad, sum(a[2][i] for a in alone), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        token_logprobs(model, TokenBatch(sequences=[shared, shared], positions=[[6], [2]]))


def _word_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *(f"w{i}" for i in range(2, 12))])}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>", eos_token="<eos>"
    )
