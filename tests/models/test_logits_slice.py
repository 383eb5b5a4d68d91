"""logits_slice runs the last layer on the sliced positions only (its other positions just write their
keys and values): the logits, the returned selections and the cache must equal a full forward's."""
import pytest
import torch

from dsarl.models import StaticKVCache, build_model
from dsarl.models.kv_cache import PrefixKV
from fresh_seeds import fresh_seed
from small_model import small_cfg

CONFIGS = {
    "dense_mlp": dict(),
    "glm_shared_last_layer": dict(num_hidden_layers=3, indexer_types=["full", "full", "shared"]),
    "moe": dict(n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=32,
                n_group=1, topk_group=1),
}


def case(config: str):
    seed = fresh_seed()
    model = build_model(small_cfg(**CONFIGS[config]), seed=seed).requires_grad_(False)
    ids = torch.randint(0, 264, (3, 21), generator=torch.Generator().manual_seed(seed))
    return model, ids, seed


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("sl", [slice(20, 21), slice(13, 21), slice(0, 21), slice(4, 9)])
def test_sliced_logits_and_selections_equal_the_full_forward(config, attention, sl):
    model, ids, seed = case(config)
    full = model(ids, attention=attention, return_indices=True)
    part = model(ids, attention=attention, return_indices=True, logits_slice=sl)
    assert part.logits.shape == full.logits[:, sl].shape
    torch.testing.assert_close(part.logits, full.logits[:, sl], atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    if attention == "sparse":
        for got, want in zip(part.indices, full.indices):
            assert torch.equal(got, want[:, sl]), f"seed {seed}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("sl", [slice(20, 21), slice(0, 0)])
def test_a_sliced_prefill_leaves_the_cache_a_full_one_leaves(config, attention, sl):
    """The engine's prefill (logits at the prompts' ends) and its KV recompute (slice(0, 0)): the cache and
    the decode step after it are those of a full prefill."""
    model, ids, seed = case(config)
    cfg = model.config
    caches = [StaticKVCache(cfg, batch_size=3, max_len=24) for _ in range(2)]
    model(ids, cache=caches[0], attention=attention)
    model(ids, cache=caches[1], attention=attention, logits_slice=sl)
    assert torch.equal(caches[0].kv, caches[1].kv) and torch.equal(caches[0].k_idx, caches[1].k_idx), f"seed {seed}"
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    nxt = torch.randint(0, 264, (3, 1), generator=torch.Generator().manual_seed(seed + 1))
    a, b = (model(nxt, cache=c, attention=attention).logits for c in caches)
    assert torch.equal(a, b), f"seed {seed}"


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_a_sliced_prefix_forward_gives_the_completion_the_same_gradient(attention):
    """The learner's prompt pass (PrefixKV, logits at the prompt's end only) and the completion pass after
    it: same log-probs, same gradient in every parameter as with the full prompt forward."""
    seed = fresh_seed()
    model = build_model(small_cfg(), seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompt, completion = torch.randint(0, 264, (2, 15), generator=g), torch.randint(0, 264, (2, 6), generator=g)
    grads, outs = [], []
    for sl in (None, slice(14, 15)):
        model.zero_grad()
        prefix = PrefixKV(model.config.num_hidden_layers)
        last = model(prompt, cache=prefix, attention=attention, logits_slice=sl).logits[:, -1]
        prefix.set_lengths(torch.tensor([15, 15]))
        comp = model(completion, cache=prefix, attention=attention).logits
        loss = torch.cat([last[:, None], comp], 1).log_softmax(-1).mean()
        loss.backward()
        outs.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6, msg=f"seed {seed}")
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=f"{n}, seed {seed}")
