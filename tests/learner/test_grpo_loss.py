import math

import pytest
import torch

from dsarl.learner.grpo_loss import GRPOLossConfig, grpo_loss
from dsarl.learner.logprobs import token_entropy, token_logprobs

LN = math.log


def _batch():
    """B=2, T=3; ratios seq0 [1.1, 1.5, pad], seq1 [0.9, 0.7, 1.0]; A = [1, -0.5]; bounds [0.8, 1.28]."""
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0]])
    log_r = torch.tensor([[LN(1.1), LN(1.5), 7.0], [LN(0.9), LN(0.7), 0.0]])
    logp = (old + log_r).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5])
    return logp, old, adv, mask


# ---------------------------------------------------------------- hand-computed loss values


def test_token_level_loss_hand_value_and_metrics():
    logp, old, adv, mask = _batch()
    loss, m = grpo_loss(logp, old, adv, mask)
    # surrogates: 1.1, min(1.5, 1.28)=1.28, -0.45, min(-0.35, -0.4)=-0.4, -0.5 -> sum 1.03 over 5 tokens
    assert loss.item() == pytest.approx(-1.03 / 5, abs=1e-6)
    assert m["clip_frac_high"] == pytest.approx(1 / 5)
    assert m["clip_frac_low"] == pytest.approx(1 / 5)
    assert m["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.9 + 0.7 + 1.0) / 5, abs=1e-6)
    assert m["offpolicy_masked_seqs"] == 0.0
    assert m["tokens"] == 5.0
    assert "kl_mean" not in m


def test_sequence_level_loss_hand_value():
    logp, old, adv, mask = _batch()
    loss, _ = grpo_loss(logp, old, adv, mask, cfg=GRPOLossConfig(aggregation="sequence"))
    # seq0 mean (1.1 + 1.28) / 2 = 1.19; seq1 mean -1.35 / 3 = -0.45; mean over 2 sequences 0.37
    assert loss.item() == pytest.approx(-0.37, abs=1e-6)


def test_normalizer_overrides_token_count():
    logp, old, adv, mask = _batch()
    loss, _ = grpo_loss(logp, old, adv, mask, normalizer=10.0)
    assert loss.item() == pytest.approx(-1.03 / 10, abs=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3", "unbiased"])
def test_kl_term_hand_value(estimator):
    logp, old, adv, mask = _batch()
    adv = torch.zeros(2)
    # q = pi_ref / pi per token (masked token's value must not matter)
    q = torch.tensor([[2.0, 0.5, 9.0], [1.0, 0.25, 4.0]])
    ref = logp.detach() + q.log()
    r = [[1.1, 1.5], [0.9, 0.7, 1.0]]
    qs = [[2.0, 0.5], [1.0, 0.25, 4.0]]
    per = []
    for ri, qi in zip(r, qs):
        for rt, qt in zip(ri, qi):
            k1 = -LN(qt)
            k3 = qt - LN(qt) - 1
            per.append({"k1": k1, "k3": k3, "unbiased": rt * k3}[estimator])
    beta = 0.1
    cfg = GRPOLossConfig(beta=beta, kl_estimator=estimator)
    loss, m = grpo_loss(logp, old, adv, mask, ref_logp=ref, cfg=cfg)
    assert loss.item() == pytest.approx(beta * sum(per) / 5, abs=1e-6)
    assert m["kl_mean"] == pytest.approx(sum(per) / 5, abs=1e-6)


def test_beta_zero_never_touches_reference_and_beta_positive_requires_it():
    logp, old, adv, mask = _batch()
    grpo_loss(logp, old, adv, mask, ref_logp=None)  # fine
    nan_ref = torch.full_like(old, float("nan"))
    loss, _ = grpo_loss(logp, old, adv, mask, ref_logp=nan_ref)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, cfg=GRPOLossConfig(beta=0.1))


# ---------------------------------------------------------------- gradients


def test_zero_advantage_zero_beta_gives_exactly_zero_gradient():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 3
    logp = (old + torch.randn(4, 6, generator=g) * 0.5).requires_grad_(True)
    mask = torch.rand(4, 6, generator=g) > 0.2
    loss, _ = grpo_loss(logp, old, torch.zeros(4), mask)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_clip_gradients_exact():
    # one token per sequence, token-level aggregation over N = 6 tokens; bounds [0.8, 1.28]
    ratios = [1.5, 0.5, 1.1, 0.5, 1.5, 1.1]
    advs = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    # A>0 & r>1.28 -> clipped (0); A>0 & r<0.8 -> unclipped; inside -> unclipped
    # A<0 & r<0.8 -> clipped (0); A<0 & r>1.28 -> unclipped; inside -> unclipped
    clipped = [True, False, False, True, False, False]
    old = torch.full((6, 1), -1.0)
    logp = (old + torch.tensor(ratios).log().unsqueeze(1)).requires_grad_(True)
    loss, m = grpo_loss(logp, old, torch.tensor(advs), torch.ones(6, 1))
    loss.backward()
    for i in range(6):
        g = logp.grad[i, 0].item()
        if clipped[i]:
            assert g == 0.0, i
        else:  # d/dlogp of -(r A)/N = -r A / N
            assert g == pytest.approx(-ratios[i] * advs[i] / 6, rel=1e-6), i
    assert m["clip_frac_high"] == pytest.approx(1 / 6)
    assert m["clip_frac_low"] == pytest.approx(1 / 6)


def test_masked_tokens_and_sequences_get_no_gradient_even_with_garbage():
    logp, old, adv, mask = _batch()
    base, _ = grpo_loss(logp[:1], old[:1], adv[:1], mask[:1])
    logp3 = torch.cat([logp.detach(), torch.tensor([[float("inf"), float("nan"), -float("inf")]])])
    logp3.requires_grad_(True)
    old3 = torch.cat([old, torch.tensor([[float("nan"), 1e30, 0.0]])])
    mask3 = torch.cat([mask[:1], torch.zeros(2, 3, dtype=torch.bool)])  # seq1 masked entirely, seq2 padding
    adv3 = torch.tensor([1.0, -0.5, 3.0])
    loss, _ = grpo_loss(logp3, old3, adv3, mask3)
    loss.backward()
    assert loss.item() == pytest.approx(base.item(), abs=1e-7)
    assert torch.equal(logp3.grad[1:], torch.zeros(2, 3))
    assert logp3.grad[0, 2].item() == 0.0
    assert torch.isfinite(logp3.grad).all()


# ---------------------------------------------------------------- KL estimators in expectation


def _toy_policies():
    theta = torch.tensor([0.3, -1.0, 1.2, 0.0, -0.4])
    old = torch.tensor([0.0, -0.5, 0.8, 0.3, -0.2])
    ref = torch.tensor([-0.2, 0.4, 0.1, 0.9, -1.0])
    return theta, old, ref


def _mc_kl(theta_logits, old_logits, ref_logits, estimator, n, seed):
    """Sample n tokens from softmax(old_logits); return (loss, theta_logits.grad, per-sample values)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(torch.softmax(old_logits, 0), n, replacement=True, generator=gen)
    theta = theta_logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, 0)[tokens].unsqueeze(1)  # [n, 1]
    old_lp = torch.log_softmax(old_logits, 0)[tokens].unsqueeze(1)
    ref_lp = torch.log_softmax(ref_logits, 0)[tokens].unsqueeze(1)
    cfg = GRPOLossConfig(beta=1.0, kl_estimator=estimator)
    loss, _ = grpo_loss(logp, old_lp, torch.zeros(n), torch.ones(n, 1), ref_logp=ref_lp, cfg=cfg)
    loss.backward()
    return loss.item(), theta.grad, tokens


def _exact_kl(theta_logits, ref_logits):
    theta = theta_logits.clone().double().requires_grad_(True)
    lp, lr = torch.log_softmax(theta, 0), torch.log_softmax(ref_logits.double(), 0)
    kl = (lp.exp() * (lp - lr)).sum()
    kl.backward()
    return kl.item(), theta.grad.float(), lp.detach(), lr


def test_unbiased_kl_matches_exact_kl_and_its_gradient_under_off_policy_sampling():
    theta, old, ref = _toy_policies()
    n = 200_000
    value, grad, tokens = _mc_kl(theta, old, ref, "unbiased", n, seed=1)
    kl, kl_grad, lp, lr = _exact_kl(theta, ref)
    lo = torch.log_softmax(old.double(), 0)
    # per-sample value and per-sample gradient wrt theta, written out by hand, only for the standard error
    w = (lp - lo).exp()[tokens]
    q = (lr - lp).exp()[tokens]
    per_value = w * (q - q.log() - 1)
    se = per_value.std().item() / math.sqrt(n)
    assert abs(value - kl) < 5 * se, (value, kl, se)
    coef = (w * (lp - lr)[tokens]).unsqueeze(1)  # [n, 1]
    per_grad = coef * (torch.nn.functional.one_hot(tokens, 5).double() - lp.exp())  # [n, V]
    grad_se = per_grad.std(dim=0).float() / math.sqrt(n)
    assert ((grad - kl_grad).abs() < 5 * grad_se + 1e-6).all(), (grad, kl_grad, grad_se)


def test_k3_is_unbiased_when_old_equals_theta():
    theta, _, ref = _toy_policies()
    n = 200_000
    value, _, tokens = _mc_kl(theta, theta, ref, "k3", n, seed=2)
    kl, _, lp, lr = _exact_kl(theta, ref)
    q = (lr - lp).exp()[tokens]
    se = (q - q.log() - 1).std().item() / math.sqrt(n)
    assert abs(value - kl) < 5 * se, (value, kl, se)


# ---------------------------------------------------------------- off-policy sequence masking


def test_offpolicy_masking_masks_exactly_the_right_sequences():
    delta = 0.5
    # per-sequence (old_logp - logp) over the valid tokens, the advantage, and whether it must be masked
    cases = [
        ([0.25, 1.0], -1.0, True),  # mean 0.625 > 0.5, A < 0
        ([0.25, 0.75], -1.0, False),  # mean exactly 0.5: not > delta
        ([1.0, 1.0], 1.0, False),  # A > 0 never masked
        ([1.0, 1.0], 0.0, False),  # A = 0 never masked
        ([0.0, 0.0], -1.0, False),  # on-policy
        ([0.75, 0.5], -2.0, True),  # mean 0.625 (the padding's huge gap must not count)
    ]
    diffs = torch.tensor([c[0] + [-50.0] for c in cases])  # third token is padding
    mask = torch.tensor([[1, 1, 0]] * len(cases), dtype=torch.bool)
    old = torch.full_like(diffs, -1.0)
    logp = (old - diffs).requires_grad_(True)
    adv = torch.tensor([c[1] for c in cases])
    loss, m = grpo_loss(logp, old, adv, mask, cfg=GRPOLossConfig(offpolicy_delta=delta, clip_high=1e9, clip_low=0.999))
    loss.backward()
    expect = [c[2] for c in cases]
    for i, masked in enumerate(expect):
        row = logp.grad[i, :2]
        if masked or adv[i] == 0:
            assert torch.equal(row, torch.zeros(2)), i
        else:
            assert (row != 0).all(), i
    assert m["offpolicy_masked_seqs"] == 2.0
    assert m["offpolicy_masked_frac"] == pytest.approx(2 / 6)


def test_offpolicy_mask_does_not_remove_kl_term():
    # eq. (8): M multiplies the surrogate only
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[-2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0]])
    cfg = GRPOLossConfig(offpolicy_delta=0.1, beta=1.0, kl_estimator="k1")
    loss, m = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), ref_logp=ref, cfg=cfg)
    assert m["offpolicy_masked_seqs"] == 1.0
    assert loss.item() == pytest.approx(-2.0 - (-1.0))


# ---------------------------------------------------------------- truncated importance sampling


def _tis_batch():
    # one sequence, two tokens, on-policy (logp == old) so ratio = 1 and surrogate per token = A = 1
    old = torch.tensor([[-1.0, -2.0]])
    logp = old.clone().requires_grad_(True)
    sampler = old - torch.tensor([[LN(1.5), LN(3.0)]])  # w = [1.5, 3.0]
    return logp, old, sampler


@pytest.mark.parametrize(("mode", "weights"), [("truncate", [1.5, 2.0]), ("mask", [1.5, 0.0])])
def test_tis_token_level_exact(mode, weights):
    logp, old, sampler = _tis_batch()
    cfg = GRPOLossConfig(tis_level="token", tis_cap=2.0, tis_mode=mode)
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), sampler_logp=sampler, cfg=cfg)
    loss.backward()
    assert loss.item() == pytest.approx(-(weights[0] + weights[1]) / 2, abs=1e-6)
    torch.testing.assert_close(logp.grad, -torch.tensor([weights]) / 2)
    assert m["tis_weight_mean"] == pytest.approx((1.5 + 3.0) / 2, abs=1e-6)
    assert m["tis_capped_frac"] == pytest.approx(0.5)
    assert m["old_logp_sampler_absdiff_max"] == pytest.approx(LN(3.0), abs=1e-6)
    assert m["old_logp_sampler_absdiff_mean"] == pytest.approx((LN(1.5) + LN(3.0)) / 2, abs=1e-6)
    assert m["logp_sampler_absdiff_max"] == pytest.approx(LN(3.0), abs=1e-6)


@pytest.mark.parametrize(("mode", "cap", "weight"), [("truncate", 1.9, 1.9), ("mask", 1.9, 0.0), ("mask", 2.5, 2.0)])
def test_tis_sequence_level_geometric_mean_exact(mode, cap, weight):
    # seq0 log-weights [ln 4, 0, pad] -> geometric mean 2; seq1 on-policy -> 1
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    logp = old.clone().requires_grad_(True)
    sampler = old - torch.tensor([[LN(4.0), 0.0, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    cfg = GRPOLossConfig(tis_level="sequence", tis_cap=cap, tis_mode=mode)
    loss, m = grpo_loss(logp, old, torch.tensor([1.0, 1.0]), mask, sampler_logp=sampler, cfg=cfg)
    assert loss.item() == pytest.approx(-(2 * weight + 3 * 1.0) / 5, abs=1e-6)
    assert m["tis_weight_mean"] == pytest.approx((2.0 + 1.0) / 2, abs=1e-6)
    assert m["tis_capped_frac"] == pytest.approx(0.5 if cap < 2.0 else 0.0)


def test_tis_requires_sampler_logp_and_config_validates():
    logp, old, _ = _tis_batch()
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), cfg=GRPOLossConfig(tis_level="token"))
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOLossConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="clip_low"):
        GRPOLossConfig(clip_low=1.0)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, torch.tensor([1.0, 2.0]), torch.ones(1, 2))


# ---------------------------------------------------------------- log-probabilities and entropy


def _ref_logprobs(logits, tokens, temperature, keep):
    """Plain float64 formula: log(exp(x_tok) / sum over kept exp(x))."""
    x = logits.double() / temperature
    e = x.exp() * (keep.double() if keep is not None else 1.0)
    p = e / e.sum(-1, keepdim=True)
    return p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log(), p


def test_token_logprobs_match_plain_formula_with_temperature():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    expected, _ = _ref_logprobs(logits, tokens, 0.7, None)
    out = token_logprobs(logits, tokens, temperature=0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_keep_mask_logprobs_renormalise_over_kept_set_and_leave_input_alone():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 9, generator=g)
    keep = torch.rand(2, 4, 9, generator=g) > 0.5
    tokens = torch.randint(0, 9, (2, 4), generator=g)
    keep.scatter_(-1, tokens.unsqueeze(-1), True)  # the sampled token is always kept
    before = logits.clone()
    expected, p = _ref_logprobs(logits, tokens, 1.3, keep)
    out = token_logprobs(logits, tokens, temperature=1.3, keep_mask=keep)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)
    token_logprobs(logits, tokens, temperature=1.0, keep_mask=keep)  # no copy of its own to mask in place
    assert torch.equal(logits, before)
    # probabilities over the kept set sum to 1: logsumexp of all kept tokens' logprobs is 0
    all_tok = torch.arange(9).expand(2, 4, 9)
    per_v = torch.stack([token_logprobs(logits, all_tok[..., v], 1.3, keep) for v in range(9)], -1)
    kept_total = torch.where(keep, per_v.exp(), torch.zeros_like(per_v)).sum(-1)
    torch.testing.assert_close(kept_total, torch.ones(2, 4))
    assert (per_v.exp()[~keep] == 0).all()


def test_token_logprobs_bf16_gradient_and_fully_masked_row_stay_finite():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 3, 7, generator=g).bfloat16().requires_grad_(True)
    tokens = torch.tensor([[1, 2, 3]])
    keep = torch.ones(1, 3, 7, dtype=torch.bool)
    keep[0, 2] = False  # a padding row with nothing kept
    out = token_logprobs(logits, tokens, keep_mask=keep)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad.float()).all()
    expected, _ = _ref_logprobs(logits.detach().float()[:, :2], tokens[:, :2], 1.0, None)
    torch.testing.assert_close(out[:, :2].double(), expected, rtol=1e-5, atol=1e-5)


def test_token_entropy_matches_plain_formula_with_mask():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    keep = torch.rand(2, 3, 8, generator=g) > 0.4
    keep[..., 0] = True
    _, p = _ref_logprobs(logits.detach(), torch.zeros(2, 3, dtype=torch.long), 0.9, keep)
    expected = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    out = token_entropy(logits, temperature=0.9, keep_mask=keep)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~keep] == 0).all()
