"""The learner's shared-prefix group forward against the plain per-sample computation."""
import random

import pytest
import torch

from dsarl.learner.grpo_batch import pad_groups
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig, group_forward
from dsarl.learner.grpo_loss import GRPOLossConfig, grpo_loss
from dsarl.learner.logprobs import token_logprobs
from dsarl.models import build_model

from tiny_groups import random_groups, small_cfg
from fresh_seeds import fresh_seed


def per_sample_logp(model, groups, attention, temperature):
    """The plain computation: one full forward of prompt + completion per sample."""
    rows = []
    for g in groups:
        for c in g.completions:
            ids = torch.tensor([g.prompt_ids + c])
            logits = model(ids, attention=attention).logits[:, len(g.prompt_ids) - 1: -1]  # predicts c
            rows.append(token_logprobs(logits, torch.tensor([c]), temperature)[0])
    return rows


@pytest.mark.parametrize("attention,completion_lens", [("dense", (1, 7)), ("sparse", (1, 7)),
                                                        # past ABSORBED_DECODE_MAX_T fed tokens dense attention
                                                        # takes the per-head form, over per-sequence keys
                                                        ("dense", (18, 22)), ("sparse", (18, 22))])
def test_shared_prefix_loss_and_gradients_equal_per_sample(attention, completion_lens):
    seed = fresh_seed()
    rng = random.Random(seed)
    # 2 index heads: ReLU scores often tie at exactly 0; the top-k's recency tie-break must make the
    # selection independent of the padded shared-prefix layout.
    model = build_model(small_cfg(), seed=seed)
    groups = random_groups(rng, P=3, G=4, completion_lens=completion_lens)
    batch = pad_groups(groups, model.config.vocab_size)
    cfg = GRPOLossConfig(beta=0.0)

    logp, _ = group_forward(model, batch, attention, 0.7, use_indices=False, keep_mask=False)
    loss, _ = grpo_loss(logp, logp.detach() + 0.05 * batch.mask, batch.advantages, batch.mask, cfg=cfg)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    rows = per_sample_logp(model, groups, attention, 0.7)
    ref_logp = torch.zeros_like(logp)
    for i, r in enumerate(rows):
        ref_logp[i, : len(r)] = r
    assert (logp - ref_logp).mul(batch.mask).abs().max() <= 1e-5, f"seed {seed}"
    ref_loss, _ = grpo_loss(ref_logp, ref_logp.detach() + 0.05 * batch.mask, batch.advantages, batch.mask, cfg=cfg)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0, name
            continue
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), f"{name} seed {seed}"



@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_one_token_completions_take_every_logprob_from_the_prompt_forward(attention):
    # The completion forward feeds tokens 0..Lc-2 (the last predicts nothing): with Lc = 1 it feeds none
    seed = fresh_seed()
    model = build_model(small_cfg(), seed=seed)
    groups = random_groups(random.Random(seed), P=3, G=2, completion_lens=(1, 1))
    batch = pad_groups(groups, model.config.vocab_size)
    logp, _ = group_forward(model, batch, attention, 1.0, use_indices=False, keep_mask=False)
    want = torch.stack(per_sample_logp(model, groups, attention, 1.0))  # [P*G, 1]
    assert logp.shape == want.shape == (6, 1)
    assert (logp - want).abs().max() <= 1e-5, f"seed {seed}"
    logp.sum().backward()
    assert model.model.layers[0].self_attn.q_a_proj.weight.grad.abs().max() > 0  # the prompt's KV is trained

def test_sampler_indices_reproduce_the_indexer_selection():
    # Feeding the selections the indexer itself makes must give the same logprobs as not feeding them.
    rng = random.Random(3)
    model = build_model(small_cfg(index_topk=3), seed=3)
    groups = random_groups(rng, P=2, G=2)
    sel = []
    for g in groups:
        for c in g.completions:
            ids = torch.tensor([g.prompt_ids + c])
            out = model(ids, attention="sparse", return_indices=True)
            plen = len(g.prompt_ids)
            per_layer = [idx[0, plen - 1: plen - 1 + len(c)] for idx in out.indices]  # [T, K] each
            sel.append(torch.stack(per_layer, dim=1))  # [T, L, K]
    it = iter(sel)
    for g in groups:
        g.indices = [next(it) for _ in g.completions]
    batch = pad_groups(groups, model.config.vocab_size)
    with torch.no_grad():
        forced, _ = group_forward(model, batch, "sparse", 1.0, use_indices=True, keep_mask=False)
        own, _ = group_forward(model, batch, "sparse", 1.0, use_indices=False, keep_mask=False)
    assert (forced - own).mul(batch.mask).abs().max() <= 1e-5
    # and a different selection changes them (the forced path is really used)
    for g in groups:
        g.indices = [torch.zeros_like(i) for i in g.indices]
    batch = pad_groups(groups, model.config.vocab_size)
    with torch.no_grad():
        wrong, _ = group_forward(model, batch, "sparse", 1.0, use_indices=True, keep_mask=False)
    assert (wrong - own).mul(batch.mask).abs().max() > 1e-3


def test_update_with_zero_advantages_leaves_weights_unchanged():
    model = build_model(small_cfg(), seed=0)
    learner = GRPOLearner(model, None, LearnerConfig())
    groups = random_groups(random.Random(0), P=2, G=3)
    for g in groups:
        g.advantages = [0.0] * len(g.advantages)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = learner.update(groups)
    assert metrics["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert learner.version == 1


def test_update_raises_logprob_of_positive_advantage_samples_and_freezes_indexer():
    model = build_model(small_cfg(), seed=1)
    learner = GRPOLearner(model, build_model(small_cfg(), seed=1),
                          LearnerConfig(loss=GRPOLossConfig(beta=0.01), ppo_epochs=2, mini_batches=2))
    groups = random_groups(random.Random(1), P=4, G=2)
    for g in groups:
        g.advantages = [1.0, -1.0]
    idx_before = [p.clone() for p in model.indexer_parameters()]
    batch = pad_groups(groups, model.config.vocab_size)
    with torch.no_grad():
        before, _ = group_forward(model, batch, "dense", 1.0, False, False)
    metrics = learner.update(groups)
    with torch.no_grad():
        after, _ = group_forward(model, batch, "dense", 1.0, False, False)
    seq = lambda lp: (lp * batch.mask).sum(1)  # noqa: E731
    delta = seq(after) - seq(before)
    assert bool((delta[0::2] > 0).all()) and bool((delta[1::2] < 0).all())
    assert metrics["optimizer_steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(idx_before, model.indexer_parameters()))


def test_train_indexer_option_moves_only_the_indexer_under_zero_advantages():
    model = build_model(small_cfg(attention="sparse", index_topk=3), seed=2)
    learner = GRPOLearner(model, None, LearnerConfig(train_indexer=True))
    groups = random_groups(random.Random(2), P=2, G=2)
    for g in groups:
        g.advantages = [0.0] * len(g.advantages)  # no policy-gradient signal: only the indexer KL acts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = learner.update(groups)
    assert metrics["indexer_kl"] > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".indexer." in k for k in changed), changed


def test_a_padded_batch_moves_every_tensor_to_the_learners_device():
    """pad_groups builds on the CPU; .to(device) must carry every tensor field, lists of tensors included
    (a GPU learner fed CPU tensors fails in its first matmul). Checked with the meta device, which every
    torch build has."""
    import dataclasses

    cfg = small_cfg()
    groups = random_groups(random.Random(0), P=2, G=3)
    for g in groups:  # every token selected key 0 in each layer: lists of index tensors travel too
        g.indices = [torch.zeros(len(c), cfg.num_hidden_layers, cfg.index_topk, dtype=torch.int32)
                     for c in g.completions]
    batch = pad_groups(groups, cfg.vocab_size)
    assert batch.indices is not None
    moved = batch.to("meta")
    for f in dataclasses.fields(batch):
        before, after = getattr(batch, f.name), getattr(moved, f.name)
        if isinstance(before, torch.Tensor):
            assert after.device.type == "meta" and after.shape == before.shape and after.dtype == before.dtype
        elif isinstance(before, list):
            assert all(a.device.type == "meta" and a.shape == b.shape for a, b in zip(after, before))
        else:
            assert after == before
    assert batch.prompts.device.type == "cpu"  # the original is left as it was
