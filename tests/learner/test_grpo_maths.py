"""The GRPO learner computes what DeepSeek-V3.2's objective says (issue #19, items 1-6): each test
builds the expected number independently of the learner and would fail on the learner's old maths."""
import math
import random

import pytest
import torch

from dsarl.learner.grpo_batch import pad_groups
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig, group_forward
from dsarl.learner.grpo_loss import GRPOLossConfig, grpo_loss
from dsarl.learner.optim import OptimConfig
from dsarl.models import build_model

from tiny_groups import random_groups, small_cfg


# ---- 1. off-policy sequence masking sees the sampler


def test_offpolicy_mask_is_computed_from_the_sampler_logprobs():
    torch.manual_seed(0)
    logp = torch.randn(4, 5) - 2.0
    mask = torch.ones(4, 5)
    adv = torch.tensor([-1.0, -0.5, 1.0, -1.0])
    # The learner is pi_old (one optimizer step per batch): old_logp == logp. The sampler put far more
    # mass on rows 0, 1 and 2 (mean log(sampler/pi) = 1.0 > delta) and the same on row 3.
    sampler = logp.clone()
    sampler[:3] += 1.0
    cfg = GRPOLossConfig(offpolicy_delta=0.5)
    loss, m = grpo_loss(logp.requires_grad_(), logp.detach(), adv, mask, sampler_logp=sampler, cfg=cfg)
    # rows 0 and 1: negative advantage and far off-policy -> masked; row 2 positive; row 3 on-policy
    assert m["offpolicy_masked_seqs"] == 2.0
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[:2].abs().max() == 0 and grad[2:].abs().min() > 0
    # without the sampler's log-probs the statistic is old - logp = 0: nothing masked
    _, m = grpo_loss(logp, logp.detach(), adv, mask, cfg=cfg)
    assert m["offpolicy_masked_seqs"] == 0.0


def test_learner_masks_negative_sequences_whose_sampler_was_far_off():
    model = build_model(small_cfg(), seed=4)
    groups = random_groups(random.Random(4), P=3, G=4, sampler_logp=0.0)  # log 1: far above any pi
    learner = GRPOLearner(model, None, LearnerConfig(loss=GRPOLossConfig(offpolicy_delta=0.1)))
    metrics = learner.update(groups)
    negative = sum(a < 0 for g in groups for a in g.advantages)
    assert negative > 0
    assert metrics["offpolicy_masked_seqs"] == negative
    assert metrics["offpolicy_masked_frac"] == pytest.approx(negative / 12)


# ---- 2. sequence aggregation divides by sequences


def test_sequence_aggregation_divides_by_the_number_of_sequences():
    # With one optimizer step pi_old = pi, so ratio = 1 and the paper's loss is
    #     -1/N sum_i 1/|o_i| sum_t A_i = -mean_i A_i     (N non-empty sequences, in every micro-batch split)
    model = build_model(small_cfg(), seed=5)
    groups = random_groups(random.Random(5), P=3, G=2)
    cfg = LearnerConfig(loss=GRPOLossConfig(aggregation="sequence"), micro_batch_groups=1,
                        optim=OptimConfig(lr=0.0, warmup_steps=0, min_lr_ratio=1.0))
    metrics = GRPOLearner(model, None, cfg).update(groups)
    advantages = [a for g in groups for a in g.advantages]
    assert metrics["loss"] == pytest.approx(-sum(advantages) / len(advantages), rel=1e-5)
    # token level for contrast: -sum_i |o_i| A_i / sum_i |o_i|
    cfg.loss = GRPOLossConfig(aggregation="token")
    metrics = GRPOLearner(model, None, cfg).update(groups)
    lengths = [len(c) for g in groups for c in g.completions]
    expected = -sum(n * a for n, a in zip(lengths, advantages)) / sum(lengths)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


# ---- 3. the learning-rate schedule


def _schedule(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to lr, then cosine down to lr * min_ratio at `total` optimizer steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


def test_grpo_learner_applies_its_lr_schedule_per_optimizer_step():
    model = build_model(small_cfg(), seed=6)
    optim = OptimConfig(lr=1e-3, warmup_steps=3, min_lr_ratio=0.1, weight_decay=0.0)
    learner = GRPOLearner(model, None, LearnerConfig(optim=optim, mini_batches=2), total_updates=5)
    groups = random_groups(random.Random(6), P=4, G=2)
    seen = []
    for update in range(5):
        learner.update(groups)
        seen.append(learner.optimizer.param_groups[0]["lr"])
        assert learner.optimizer_steps == 2 * (update + 1)
    expected = [_schedule(2 * u + 1, 10, 1e-3, 3, 0.1) for u in range(5)]  # the LR of each update's last step
    assert seen == pytest.approx(expected, rel=1e-9)
    assert seen[0] < seen[1] == pytest.approx(1e-3) and seen[1] > seen[2] > seen[3] > seen[4] > 1e-4  # warm-up, decay


def test_lr_schedule_position_survives_resume(tmp_path):
    from dsarl.actors.learner_actor import Learner
    from dsarl.models import save_pretrained

    save_pretrained(build_model(small_cfg(), seed=7), tmp_path / "init")
    optim = OptimConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.0, weight_decay=0.0)
    cfg = LearnerConfig(optim=optim)
    groups = random_groups(random.Random(7), P=2, G=2)
    first = Learner(str(tmp_path / "init"), cfg, total_updates=4)
    for _ in range(2):
        first.update(groups)
    ckpt = first.save(str(tmp_path / "run"), 2, {"step": 2})
    resumed = Learner(str(tmp_path / "init"), cfg, resume_from=ckpt, total_updates=4)
    assert resumed.learner.optimizer_steps == 2
    resumed.update(groups)
    assert resumed.learner.optimizer.param_groups[0]["lr"] == pytest.approx(_schedule(2, 4, 1e-3, 2, 0.0))


# ---- 4. one temperature; truncated sampling only with its keep mask


def _grpo_config(*overrides):
    from dsarl.launch.config import load_config
    from dsarl.launch.grpo_loop import GRPOConfig

    return load_config(GRPOConfig, None, list(overrides))


def test_learner_temperature_is_the_rollout_temperature():
    from dsarl.models.config import ConfigError

    cfg = _grpo_config("rollout.temperature=0.7")
    assert cfg.learner.temperature is None  # nothing to keep in sync: the trainer passes 0.7 on
    assert _grpo_config("rollout.temperature=0.7", "learner.temperature=0.7").rollout.temperature == 0.7
    with pytest.raises(ConfigError, match=r"learner.temperature \(0.5\) differs from rollout.temperature \(0.7\)"):
        _grpo_config("rollout.temperature=0.7", "learner.temperature=0.5")


def test_learner_logprobs_use_the_given_temperature():
    model = build_model(small_cfg(), seed=8)
    groups = random_groups(random.Random(8), P=2, G=2)
    batch = pad_groups(groups, model.config.vocab_size)
    learner = GRPOLearner(model, None, LearnerConfig(temperature=0.5))
    with torch.no_grad():
        got = learner._logp(model, batch)[0]
        want = group_forward(model, batch, "dense", 0.5, False, False)[0]
        at_one = group_forward(model, batch, "dense", 1.0, False, False)[0]
    assert torch.equal(got, want) and not torch.allclose(got, at_one)


@pytest.mark.parametrize("overrides", [["rollout.top_p=0.9", "rollout.engine=vllm"],
                                       ["rollout.top_k=20", "learner.keep_sampling_mask=false"]])
def test_truncated_sampling_without_keep_mask_is_refused_unless_opted_in(overrides):
    from dsarl.models.config import ConfigError

    with pytest.raises(ConfigError, match="allow_unmasked_truncation"):
        _grpo_config(*overrides)
    cfg = _grpo_config(*overrides, "rollout.allow_unmasked_truncation=true")
    assert cfg.unmasked_truncation
    assert not _grpo_config("rollout.top_p=0.9").unmasked_truncation  # native engine + keep mask: exact


# ---- 5. pi_ref attends with its own indexer


def test_reference_model_selects_keys_with_its_own_indexer():
    cfg = small_cfg(attention="sparse", index_topk=2)
    policy, reference = build_model(cfg, seed=9), build_model(cfg, seed=10)
    groups = random_groups(random.Random(9), P=2, G=2)
    # the sampler's selection, recorded from the *policy's* indexer
    for g in groups:
        g.indices = []
        for c in g.completions:
            out = policy(torch.tensor([g.prompt_ids + c]), attention="sparse", return_indices=True)
            plen = len(g.prompt_ids)
            g.indices.append(torch.stack([i[0, plen - 1: plen - 1 + len(c)] for i in out.indices], dim=1))
    batch = pad_groups(groups, cfg.vocab_size)
    with torch.no_grad():
        own = group_forward(reference, batch, "sparse", 1.0, use_indices=False, keep_mask=False)[0]
        replayed = group_forward(reference, batch, "sparse", 1.0, use_indices=True, keep_mask=False)[0]
    assert (own - replayed).mul(batch.mask).abs().max() > 1e-4  # the two selections really differ here
    learner = GRPOLearner(policy, reference, LearnerConfig(loss=GRPOLossConfig(beta=0.1)))
    assert torch.equal(learner.reference_logp(batch), own)
    learner.cfg.reference_replays_indices = True  # the explicit option
    assert torch.equal(learner.reference_logp(batch), replayed)


# ---- 6. counts are counts; the indexer's gradient is clipped on its own


def test_count_metrics_are_sums_over_the_batch():
    model = build_model(small_cfg(), seed=11)
    groups = random_groups(random.Random(11), P=4, G=3, sampler_logp=0.0)
    learner = GRPOLearner(model, None, LearnerConfig(loss=GRPOLossConfig(offpolicy_delta=0.1), micro_batch_groups=1))
    metrics = learner.update(groups)
    assert metrics["tokens"] == sum(g.num_tokens for g in groups)
    assert metrics["sequences"] == 12
    assert metrics["offpolicy_masked_seqs"] == sum(a < 0 for g in groups for a in g.advantages)


def test_train_indexer_gradient_is_clipped_apart_from_the_policy_gradient():
    cfg = small_cfg(attention="sparse", index_topk=3)
    groups = random_groups(random.Random(12), P=2, G=2)
    optim = OptimConfig(lr=0.0, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=1e-3)

    def grads_after_update(train_indexer: bool):
        model = build_model(cfg, seed=12)
        learner = GRPOLearner(model, None, LearnerConfig(optim=optim, train_indexer=train_indexer,
                                                         indexer_grad_clip=1e-4))
        metrics = learner.update(groups)  # lr 0: the clipped gradients stay on the parameters
        return model, metrics

    plain, m_plain = grads_after_update(False)
    both, m_both = grads_after_update(True)
    n = m_both["indexer_grad_norm"]  # before clipping
    assert n > 1e-4  # the KL gradient was larger than its clip
    indexer = {id(p) for p in both.indexer_parameters()}
    for (name, a), b in zip(both.named_parameters(), plain.parameters()):
        if id(a) in indexer:
            continue
        # the policy's clipped gradient is the same whether or not the indexer trains beside it
        assert (a.grad is None and b.grad is None) or torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-12), name
    norm = torch.norm(torch.stack([p.grad.norm() for p in both.indexer_parameters() if p.grad is not None]))
    assert float(norm) == pytest.approx(1e-4 * n / (n + 1e-6), rel=1e-4)  # torch clips by max / (norm + 1e-6)
    assert m_both["grad_norm"] == pytest.approx(m_plain["grad_norm"], rel=1e-5)
