"""The MoE block against plain references: grouped expert compute = a loop over tokens (outputs and
gradients), group-limited routing = brute force per token (exact expert sets), routing replay, the frozen bias."""
import itertools

import pytest
import torch

from dsarl.models import DSAConfig, build_model
from dsarl.models.layers import SwiGLU
from dsarl.models.moe import MoE, TopkRouter, grouped_expert_forward
from fresh_seeds import fresh_seed


def test_grouped_experts_equal_a_loop_over_tokens():
    seed = fresh_seed()
    torch.manual_seed(seed)
    N, H, E, k = 37, 12, 5, 3
    experts = torch.nn.ModuleList(SwiGLU(H, 7) for _ in range(E))
    x = torch.randn(N, H, requires_grad=True)
    chosen = torch.stack([torch.randperm(E)[:k] for _ in range(N)])  # [N, k], distinct per token
    chosen[0] = torch.tensor([0, 1, 2])  # expert 4 may get no token; make sure some expert is idle too
    weights = torch.rand(N, k, requires_grad=True)
    out = grouped_expert_forward(x, weights, chosen, experts)
    ref = torch.stack([sum(weights[n, j] * experts[int(chosen[n, j])](x[n]) for j in range(k)) for n in range(N)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
    grad = torch.randn(N, H)
    got = torch.autograd.grad(out, [x, weights, *experts.parameters()], grad)
    want = torch.autograd.grad(ref, [x, weights, *experts.parameters()], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2), (6, 3)])
def test_group_limited_choice_matches_brute_force(n_group, topk_group):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    E, k, H, N = 12, 3, 8, 29
    router = TopkRouter(H, E, k, n_group, topk_group, norm_topk_prob=True, scaling=2.5)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=g))
        router.e_score_correction_bias.copy_(0.3 * torch.randn(E, generator=g))
    x = torch.randn(N, H, generator=g)
    weights, chosen = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    size = E // n_group
    for n in range(N):
        c = (scores[n] + router.e_score_correction_bias).tolist()
        group_score = [sum(sorted(c[i * size:(i + 1) * size])[-2:]) if n_group > 1 else 0.0 for i in range(n_group)]
        groups = sorted(range(n_group), key=lambda i: -group_score[i])[:topk_group]
        allowed = [e for e in range(E) if e // size in groups]
        expect = set(sorted(allowed, key=lambda e: -c[e])[:k])
        assert set(chosen[n].tolist()) == expect, f"seed {seed} token {n}"
        w = scores[n, chosen[n]]  # weights from the scores without the bias, normalised, scaled
        torch.testing.assert_close(weights[n], 2.5 * w / w.sum())


def moe_cfg(**kw) -> DSAConfig:
    base = dict(vocab_size=264, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                index_n_heads=2, index_head_dim=16, index_topk=4, n_routed_experts=8, n_group=2, topk_group=1,
                num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)
    base.update(kw)
    return DSAConfig(**base)


def test_layer_types_follow_first_k_dense_replace_and_mlp_layer_types():
    model = build_model(moe_cfg(), seed=0)
    assert [type(layer.mlp) for layer in model.model.layers] == [SwiGLU, MoE, MoE]
    model = build_model(moe_cfg(mlp_layer_types=["sparse", "dense", "sparse"]), seed=0)
    assert [type(layer.mlp) for layer in model.model.layers] == [MoE, SwiGLU, MoE]
    assert all(type(layer.mlp) is SwiGLU for layer in build_model(moe_cfg(n_routed_experts=None), seed=0).model.layers)


def test_routing_replay_and_frozen_bias():
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    names = dict(model.named_parameters())
    assert not any("e_score_correction_bias" in n for n in names)  # a buffer: no optimizer ever sees it
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()  # but it is saved
    ids = torch.randint(0, 264, (2, 11), generator=torch.Generator().manual_seed(seed))
    for attention in ("dense", "sparse"):
        out = model(ids, attention=attention, return_experts=True)
        assert out.experts[0] is None and out.experts[1].shape == (2, 11, 2)
        replayed = model(ids, attention=attention, experts=out.experts)
        torch.testing.assert_close(replayed.logits, out.logits, rtol=0, atol=0)
    other = [None] + [(e + 1) % 8 for e in out.experts[1:]]  # a different routing changes the output
    assert (model(ids, experts=other).logits - out.logits).abs().max() > 1e-4
    model(ids, experts=out.experts).logits.square().mean().backward()
    assert names["model.layers.1.mlp.gate.weight"].grad.abs().sum() > 0  # replay keeps the router's gradient


def test_bf16_model_keeps_router_and_indexer_weights_fp32():
    model = build_model(moe_cfg(torch_dtype="bfloat16"), seed=0)
    dtypes = {n: p.dtype for n, p in itertools.chain(model.named_parameters(), model.named_buffers())}
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
    assert dtypes["model.layers.0.self_attn.indexer.weights_proj.weight"] == torch.float32
    assert dtypes["model.layers.1.mlp.experts.0.up_proj.weight"] == torch.bfloat16
    ids = torch.randint(0, 264, (1, 9))
    for attention in ("dense", "sparse"):
        assert torch.isfinite(model(ids, attention=attention).logits.float()).all()
