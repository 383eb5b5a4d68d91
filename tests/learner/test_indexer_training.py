"""Conversion-stage maths against plain computations: the warm-up touches only the indexers and its
chunked KL (and gradient) is the plain dense KL; the sparse stage gives the indexer exactly the
gradient of the restricted KL and the model exactly that of the LM loss; sparse = dense LM loss at
k >= L; the KL is 0 at the target; the diagnostics."""
import copy

import pytest
import torch

from dsarl import kernels
from dsarl.learner.conversion import OptimizerPair, freeze_all_but_indexer, sparse_step, split_parameters, warmup_step
from dsarl.learner.diagnostics import layer_diagnostics, mass_recall, oracle_recall, topk_overlap
from dsarl.learner.indexer_training import (absorbed_qkv, dense_target_chunk, lm_loss, rope_for_cfg, sparse_losses,
                                            warmup_losses)
from dsarl.learner.optim import OptimConfig, build_optimizer
from dsarl.models import DSAConfig, build_model

T = 24


def tiny(**kw):
    cfg = DSAConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    index_n_heads=3, index_head_dim=16, index_topk=kw.pop("index_topk", 6), **kw)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # larger weights than the 0.02 init: peaked attention, a non-trivial selection
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def ids(B=2, seed=1):
    return torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def plain_indexer_scores(indexer, c_q, x, cos, sin):
    """I[b, t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) as loops over heads, -inf above the diagonal."""
    q, w = indexer.queries(c_q, x, cos, sin)
    k = indexer.keys(x, cos, sin)
    scores = sum(w[:, :, j, None] * torch.relu(q[:, :, j] @ k.transpose(1, 2)) for j in range(q.shape[2]))
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))  # [B, T, S]


def plain_kl(p, logits, valid):
    """mean over queries of sum_s p log(p / softmax(logits)) over valid keys, p L1-normalised."""
    p = p.masked_fill(~valid, 0)
    p = p / p.sum(-1, keepdim=True)
    logq = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), -1)
    terms = torch.where(p > 0, p * (p.clamp(min=1e-30).log() - logq.masked_fill(~valid, 0)), torch.zeros_like(p))
    return terms.sum(-1).mean()


def dense_probs_via_model(model, input_ids):
    """Head-summed attention of every layer over all keys, from the model's own sparse path at k >= L."""
    wide = copy.deepcopy(model)
    wide.config = wide.config.replace(index_topk=T)
    for layer in wide.model.layers:
        layer.self_attn.cfg = wide.config
    out = wide(input_ids, attention="sparse", collect_aux=True)
    probs = []
    for aux in out.aux:
        full = torch.zeros(*aux.indices.shape[:2], T)
        full.scatter_add_(-1, aux.indices.clamp(min=0).long(), aux.attn_probs.masked_fill(aux.indices < 0, 0))
        probs.append(full)
    return probs


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.707}  # mscale != mscale_all_dim: cos/sin are scaled too


@pytest.mark.parametrize("rope", [None, YARN], ids=["plain", "yarn"])
def test_dense_target_is_the_models_own_head_summed_attention(rope):
    model = tiny(rope_parameters=rope)
    x = ids()[:, :-1]
    with torch.no_grad():
        aux = model(x, attention="dense", collect_aux=True).aux
        expected = dense_probs_via_model(model, x)
        for layer, a, want in zip(model.model.layers, aux, expected):
            cos, sin = rope_for_cfg(model.config, a.positions)
            q, kv = absorbed_qkv(layer.self_attn, a.x, a.c_q, cos, sin)
            got = torch.cat([dense_target_chunk(layer.self_attn, q, kv, a.positions, t0, min(T, t0 + 5))
                             for t0 in range(0, T, 5)], dim=1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert torch.allclose(got.sum(-1), torch.full((2, T), 3.0))  # 3 heads, each sums to 1


@pytest.mark.parametrize("chunk", [5, T])
def test_warmup_kl_and_gradient_equal_the_plain_dense_kl(chunk):
    model = tiny()
    freeze_all_but_indexer(model)
    x = ids()[:, :-1]
    stats = warmup_losses(model, x, chunk)  # fills .grad
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        aux = model(x, attention="dense", collect_aux=True).aux
        targets = dense_probs_via_model(model, x)
    kls = []
    for layer, a, target in zip(model.model.layers, aux, targets):
        cos, sin = rope_for_cfg(model.config, a.positions)
        scores = plain_indexer_scores(layer.self_attn.indexer, a.c_q, a.x, cos, sin)
        kls.append(plain_kl(target, scores, torch.isfinite(scores)))
    want = torch.stack(kls).mean()
    assert abs(stats.indexer_kl - want.item()) < 1e-5 * max(1.0, want.item()), (stats.indexer_kl, want.item())
    assert want.item() > 1e-3  # an untrained indexer is far from the target: the test can fail
    names = list(got)
    grads = torch.autograd.grad(want, [dict(model.named_parameters())[n] for n in names])
    for n, g in zip(names, grads):
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_warmup_step_changes_only_indexer_parameters():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freeze_all_but_indexer(model)
    opt = build_optimizer(model.indexer_parameters(), OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1))
    warmup_step(model, opt, ids(), chunk=7, lr=1e-2, grad_clip=1.0)
    changed = 0
    for n, p in model.named_parameters():
        if ".indexer." in n:
            changed += int(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), f"{n} changed in the warm-up"
    assert changed == len(model.indexer_parameters())


def test_sparse_step_gives_each_parameter_set_only_its_own_loss_gradient():
    model = tiny(index_topk=6)
    reference = copy.deepcopy(model)
    input_ids = ids()
    main, index = split_parameters(model)
    zero = OptimConfig(lr=0.0, warmup_steps=1, grad_clip=0.0)
    opt = OptimizerPair(build_optimizer(main, zero), build_optimizer(index, zero))
    sparse_step(model, opt, input_ids, chunk=5, lrs=(0.0, 0.0), clips=(0.0, 0.0))

    # LM loss alone, main model parameters
    out = reference(input_ids[:, :-1], attention="sparse", collect_aux=True)
    r_main, r_index = split_parameters(reference)
    g_lm = torch.autograd.grad(lm_loss(out.logits, input_ids[:, 1:]), r_main, allow_unused=True)
    # restricted KL alone (plain: full scores, gathered on S_t), indexer parameters
    kls = []
    for layer, a in zip(reference.model.layers, out.aux):
        cos, sin = rope_for_cfg(reference.config, a.positions)
        scores = plain_indexer_scores(layer.self_attn.indexer, a.c_q.detach(), a.x.detach(), cos, sin)
        valid = a.indices >= 0
        on_s = scores.gather(-1, a.indices.clamp(min=0).long())
        assert (valid.sum(-1) == torch.arange(T).clamp(max=5) + 1).all()  # k=6 < T: a real selection
        kls.append(plain_kl(a.attn_probs, on_s, valid))
    g_kl = torch.autograd.grad(torch.stack(kls).mean(), r_index)

    for p, g in zip(main, g_lm):
        assert g is not None and p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)
    for p, g in zip(index, g_kl):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-8)
    # and the LM loss alone reaches no indexer parameter
    out2 = reference(input_ids[:, :-1], attention="sparse")
    assert all(g is None for g in torch.autograd.grad(lm_loss(out2.logits, input_ids[:, 1:]), r_index,
                                                      allow_unused=True))


def test_sparse_lm_loss_equals_dense_when_topk_covers_the_sequence():
    model = tiny(index_topk=T)
    input_ids = ids()
    loss, kls, _ = sparse_losses(model, input_ids[:, :-1], input_ids[:, 1:], chunk=5)
    dense = lm_loss(model(input_ids[:, :-1], attention="dense").logits, input_ids[:, 1:])
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)
    assert (kls > 0).all()  # the KL still trains the indexer on the full set


def test_kl_is_zero_when_the_indexer_distribution_equals_the_target():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 5, 7, generator=g) * 3  # head-summed mass, unnormalised
    valid = torch.rand(2, 5, 7, generator=g) > 0.3
    valid[..., 0] = True
    scores = (probs / probs.sum(-1, keepdim=True)).log() + 2.5  # same distribution on every S_t
    assert kernels.indexer_kl_loss(probs, scores, valid).abs() < 1e-6
    assert kernels.indexer_kl_loss(probs, scores.masked_fill(~valid, float("-inf"))).abs() < 1e-6
    shifted = scores.clone()
    shifted[..., 0] += 1.0
    assert kernels.indexer_kl_loss(probs, shifted, valid) > 1e-3


def test_mass_recall_and_overlap_against_plain_counts():
    p = torch.tensor([[[0.5, 0.0, 0.0], [0.2, 0.6, 0.0], [0.1, 0.3, 0.6]]])  # [1, 3, 3], rows sum < 1 ok
    idx = torch.tensor([[[0, -1], [1, -1], [2, 0]]])
    want = torch.tensor([[1.0, 0.6 / 0.8, 0.7]])
    torch.testing.assert_close(mass_recall(p, idx), want)
    a = torch.tensor([[[0, 1, 2], [3, 4, -1]]])
    b = torch.tensor([[[2, 1, 0], [4, 5, -1]]])
    torch.testing.assert_close(topk_overlap(a, b), torch.tensor([[1.0, 0.5]]))
    # the k heaviest keys of each row: {0}, {1}, {2} at k = 1; all mass at k = 3
    torch.testing.assert_close(oracle_recall(p, 1), torch.tensor([[1.0, 0.6 / 0.8, 0.6]]))
    torch.testing.assert_close(oracle_recall(p, 3), torch.ones(1, 3))


def test_layer_diagnostics_full_selection_recalls_everything():
    model = tiny(index_topk=T)
    with torch.no_grad():
        aux = model(ids()[:, :-1], attention="dense", collect_aux=True).aux
    d = layer_diagnostics(model.model.layers[0].self_attn, aux[0], topk=T, chunk=7)
    assert abs(d.recall - 1.0) < 1e-5 and d.fp8_overlap == 1.0
    d4 = layer_diagnostics(model.model.layers[0].self_attn, aux[0], topk=4, chunk=7)
    assert d4.recall < 1.0 and d4.recall_long < d4.recall and 0.5 < d4.fp8_overlap <= 1.0
    assert d4.recall <= d4.recall_oracle + 1e-6 < 1.0 and abs(d.recall_oracle - 1.0) < 1e-5  # the bound holds


def test_sparse_lm_loss_weights_are_a_weighted_mean_over_targets():
    """sparse_losses with per-target weights = sum_t w_t CE_t / sum_t w_t of the sparse logits, by hand."""
    model = tiny()
    input_ids = ids()
    w = torch.zeros(2, T)
    w[:, 5:9] = 1.0  # "answers"
    w[1, 0] = 0.1
    loss, _, out = sparse_losses(model, input_ids[:, :-1], input_ids[:, 1:], chunk=5, weights=w)
    logp = torch.log_softmax(out.logits.float(), -1)
    by_hand = sum(-w[b, t] * logp[b, t, input_ids[b, t + 1]] for b in range(2) for t in range(T)) / w.sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    plain, _, _ = sparse_losses(model, input_ids[:, :-1], input_ids[:, 1:], chunk=5)
    assert plain.item() == pytest.approx(-logp.gather(-1, input_ids[:, 1:, None]).mean().item(), rel=1e-5)
    assert abs(plain.item() - loss.item()) > 1e-3
