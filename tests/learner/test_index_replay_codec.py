"""Index replay from the encoded record gives the learner the same bits as the raw record.

The sampler's selections here are the model's own (best first, -1 padded), recorded per completion as
the engine records them: [T, L, K] for the queries plen - 1 .. plen - 1 + T - 1."""
import copy
import random

import pytest
import torch

from dsarl.data.index_codec import encode_indices
from dsarl.learner.grpo_batch import pad_groups
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig, group_forward
from dsarl.learner.grpo_loss import GRPOLossConfig, grpo_loss
from dsarl.models import build_model

from tiny_groups import random_groups, small_cfg

K = 3


def record_selections(model, groups) -> list[list[torch.Tensor]]:
    out = []
    for g in groups:
        plen, per = len(g.prompt_ids), []
        for c in g.completions:
            sel = model(torch.tensor([g.prompt_ids + c]), attention="sparse", return_indices=True).indices
            per.append(torch.stack([i[0, plen - 1: plen - 1 + len(c)] for i in sel], dim=1))  # [T, L, K]
        out.append(per)
    return out


def with_indices(groups, records, encode: bool):
    groups = copy.deepcopy(groups)
    for g, rec in zip(groups, records):
        g.indices = [encode_indices(r) if encode else r.clone() for r in rec]
    return groups


def loss_and_grads(model, groups):
    batch = pad_groups(groups, model.config.vocab_size)
    logp, _ = group_forward(model, batch, "sparse", 0.7, use_indices=True, keep_mask=False)
    loss, _ = grpo_loss(logp, logp.detach() + 0.05 * batch.mask, batch.advantages, batch.mask,
                        sampler_logp=batch.sampler_logp, cfg=GRPOLossConfig(beta=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    return logp.detach(), loss, torch.autograd.grad(loss, params, allow_unused=True), batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradients_are_bit_identical_encoded_vs_raw(seed):
    rng = random.Random(seed)
    model = build_model(small_cfg(attention="sparse", index_topk=K), seed=seed)
    groups = random_groups(rng, P=3, G=3)
    records = record_selections(model, groups)
    assert any((r[..., 0] >= 0).all() and (r >= 0).all(-1).any() for rec in records for r in rec)
    raw_logp, raw_loss, raw_grads, raw_batch = loss_and_grads(model, with_indices(groups, records, encode=False))
    enc_logp, enc_loss, enc_grads, enc_batch = loss_and_grads(model, with_indices(groups, records, encode=True))
    assert all(torch.equal(a, b) for a, b in zip(raw_batch.indices, enc_batch.indices))
    assert torch.equal(raw_logp, enc_logp) and torch.equal(raw_loss, enc_loss)
    for (name, _), a, b in zip(model.named_parameters(), raw_grads, enc_grads):
        assert (a is None and b is None) or torch.equal(a, b), name

    # the replayed selection reaches the loss: one key swapped for another visible key changes it
    changed = copy.deepcopy(records)
    for rec, g in zip(changed, groups):
        for r in rec:
            plen = len(g.prompt_ids)
            for t in range(1, r.shape[0]):  # row t is replayed by the learner's query plen + t - 1
                row = r[t, 0]
                free = [s for s in range(plen + t) if s not in row.tolist()]
                if free and (row >= 0).all():
                    row[0] = free[0]
                    break
    other_logp, _, other_grads, _ = loss_and_grads(model, with_indices(groups, changed, encode=True))
    assert not torch.equal(other_logp, enc_logp)  # (the loss's value is exp(-0.05) * A whatever logp is)
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(other_grads, enc_grads))


def test_learner_update_is_bit_identical_encoded_vs_raw():
    rng = random.Random(7)
    model = build_model(small_cfg(attention="sparse", index_topk=K), seed=7)
    groups = random_groups(rng, P=2, G=3)
    records = record_selections(model, groups)
    runs = []
    for encode in (False, True):
        policy = copy.deepcopy(model)
        learner = GRPOLearner(policy, None, LearnerConfig())
        learner.cfg.temperature = 0.7
        metrics = learner.update(with_indices(groups, records, encode))
        runs.append((metrics, policy.state_dict()))
    (m_raw, s_raw), (m_enc, s_enc) = runs
    assert m_raw == m_enc
    assert all(torch.equal(s_raw[k], s_enc[k]) for k in s_raw)
    assert any(not torch.equal(s_raw[k], v) for k, v in model.state_dict().items())  # the step moved weights


def test_a_batch_whose_queries_see_at_most_k_keys_replays_as_dense_attention():
    """Prompts of up to 9 tokens and completions of up to 7 against K = 16: the sampler selected every
    key each query saw, so the batch carries no decoded selections (pad_groups' dense_within) and the
    sparse learner computes dense attention's log-probs, bit for bit. A model made to replay the recorded
    selections through the sparse kernels (index_dense_when_all_fit off) agrees to rounding."""
    rng = random.Random(3)
    cfg = small_cfg(attention="sparse", index_topk=16)
    model = build_model(cfg, seed=3)
    groups = random_groups(rng, P=3, G=2)
    records = record_selections(model, groups)
    assert all((r >= 0).sum(-1).max() < 16 for rec in records for r in rec)  # every row is a visible prefix
    groups = with_indices(groups, records, encode=True)
    batch = pad_groups(groups, cfg.vocab_size, dense_within=cfg.dense_within)
    assert batch.indices is None and batch.prompts.shape[1] + batch.completions.shape[1] <= 16
    sparse = group_forward(model, batch, "sparse", 0.7, use_indices=True, keep_mask=False)[0]
    dense = group_forward(model, batch, "dense", 0.7, use_indices=True, keep_mask=False)[0]
    assert torch.equal(sparse, dense)
    replaying = build_model(cfg.replace(index_dense_when_all_fit=False), seed=3)
    replayed_batch = pad_groups(groups, cfg.vocab_size)
    assert replayed_batch.indices is not None
    replayed = group_forward(replaying, replayed_batch, "sparse", 0.7, use_indices=True, keep_mask=False)[0]
    real = batch.mask.bool()  # padded positions query nothing the sampler selected
    torch.testing.assert_close(replayed[real], sparse[real], rtol=0, atol=1e-5)
