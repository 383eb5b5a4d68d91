"""The student's distillation step (learner/distill.py): the OPD loss against hand-computed reverse
KLs and an unpadded per-sequence reference, zero when student equals teacher, the SFT loss, and the
combined step."""
import math

import pytest
import torch
import torch.nn as nn

from dsarl.learner.distill import Distiller, Sequences, completion_log_probs, pad_sequences, sft_loss
from dsarl.learner.optim import OptimConfig
from dsarl.models import DSAConfig, build_model

OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=0.0)


class _Cfg:
    pad_token_id = 0
    attention = "dense"


class TableLM(nn.Module):
    """A toy LM over a 3-token vocabulary: the logits at position t are row t of a table, whatever the
    input. So the student's distribution at every position is known by hand."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.config = _Cfg()
        self.table = nn.Parameter(rows.clone())

    def forward(self, ids, attention=None):
        B, T = ids.shape
        return type("Out", (), {"logits": self.table[:T].expand(B, T, -1)})()


def tiny_model(seed: int):
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4)
    return build_model(cfg, seed=seed)


def test_opd_step_reports_hand_computed_reverse_kl_and_its_gradient():
    # prompt of 2 tokens, completion of 2: the logits predicting the completion are table rows 1 and 2
    ps = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25], [0.8, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    pt = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.4, 0.4]])
    model = TableLM(ps.log() + 2.0)  # softmax ignores the shift
    # KL(s||t) at row 1 = 1/2 ln 2 + 1/4 ln(1/2) = 1/4 ln 2; at row 2 = 0.8 ln 4 + 0.2 ln(1/4)
    expected = (0.25 * math.log(2) + 0.8 * math.log(4) + 0.2 * math.log(0.25)) / 2
    d = Distiller(model, OPTIM)
    m = d.step(lr=0.0, opd=Sequences([[1, 2]], [[0, 1]]), teacher_logp=[pt.log()])
    assert m["opd/reverse_kl"] == pytest.approx(expected, abs=1e-6)
    assert m["opd/tokens"] == 2
    # d KL / d logit_v = p_s(v) (log p_s(v) - log p_t(v) - KL), per position, divided by 2 tokens
    grad = model.table.grad
    for row, t in ((1, pt[0]), (2, pt[1])):
        p = ps[row]
        kl = float((p * (p.log() - t.log())).sum())
        assert torch.allclose(grad[row], p * (p.log() - t.log() - kl) / 2, atol=1e-6)
    assert torch.equal(grad[0], torch.zeros(3)) and torch.equal(grad[3:], torch.zeros_like(grad[3:]))


def test_opd_loss_is_zero_and_gradient_zero_when_student_equals_teacher():
    model = tiny_model(0)
    seqs = Sequences([[1, 40, 41], [1, 50]], [[60, 61, 2], [70]])
    teacher = completion_log_probs(model, seqs)
    d = Distiller(model, OPTIM)
    m = d.step(lr=0.0, opd=seqs, teacher_logp=teacher)
    assert abs(m["opd/reverse_kl"]) < 1e-6
    assert m["grad_norm"] < 1e-5


def _reference_kl(student, teacher, seqs):
    """Independent reference: each sequence alone (no padding), KL summed over positions by hand."""
    total, n = 0.0, 0
    for p, c in zip(seqs.prompts, seqs.completions):
        ids = torch.tensor([p + c[:-1]])
        with torch.no_grad():
            ls = torch.log_softmax(student(ids).logits[0, len(p) - 1:].double(), -1)
            lt = torch.log_softmax(teacher(ids).logits[0, len(p) - 1:].double(), -1)
        total += float((ls.exp() * (ls - lt)).sum())
        n += len(c)
    return total / n


def test_opd_step_matches_unpadded_reference_across_ragged_sequences():
    student, teacher = tiny_model(0), tiny_model(1)
    seqs = Sequences([[1, 40, 41, 42], [1, 50], [1, 7, 8]], [[60, 61], [70, 71, 72, 2], [9]])
    teacher_logp = completion_log_probs(teacher, seqs)
    assert [t.shape for t in teacher_logp] == [(2, 264), (4, 264), (1, 264)]
    m = Distiller(student, OPTIM, micro_batch=2).step(lr=0.0, opd=seqs, teacher_logp=teacher_logp)
    assert m["opd/reverse_kl"] == pytest.approx(_reference_kl(student, teacher, seqs), rel=1e-4)
    assert m["opd/reverse_kl"] > 1e-3


def test_sft_loss_is_mean_token_nll_of_unpadded_sequences():
    model = tiny_model(0)
    seqs = Sequences([[1, 40, 41], [1, 50]], [[60, 2], [70, 71, 2]])
    ref, n = 0.0, 0
    for p, c in zip(seqs.prompts, seqs.completions):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].double(), -1)
        ref -= sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c))
        n += len(c)
    m = Distiller(model, OPTIM, micro_batch=1).step(lr=0.0, sft=seqs)
    assert m["sft/loss"] == pytest.approx(ref / n, rel=1e-5)
    _, _, targets, mask = pad_sequences(seqs, 0)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert sft_loss(torch.zeros(2, 3, 5), targets.clamp(max=4), mask).item() == pytest.approx(math.log(5), rel=1e-6)


def test_combined_step_gradient_is_sum_of_the_parts():
    seqs_sft = Sequences([[1, 40, 41]], [[60, 2]])
    seqs_opd = Sequences([[1, 50]], [[70, 71]])
    teacher = completion_log_probs(tiny_model(1), seqs_opd)

    def grads(**kw):
        model = tiny_model(0)
        Distiller(model, OPTIM).step(lr=0.0, **kw)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    both = grads(sft=seqs_sft, opd=seqs_opd, teacher_logp=teacher, sft_coef=0.5, kl_coef=2.0)
    parts = 0.5 * grads(sft=seqs_sft) + 2.0 * grads(opd=seqs_opd, teacher_logp=teacher)
    assert torch.allclose(both, parts, atol=1e-6)


def test_training_on_teacher_distributions_lowers_the_kl():
    student, teacher = tiny_model(0), tiny_model(1)
    seqs = Sequences([[1, 40, 41]] * 2, [[60, 61, 62], [63, 64, 2]])
    teacher_logp = completion_log_probs(teacher, seqs)
    d = Distiller(student, OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0))
    first = d.step(lr=1e-2, opd=seqs, teacher_logp=teacher_logp)["opd/reverse_kl"]
    for _ in range(20):
        last = d.step(lr=1e-2, opd=seqs, teacher_logp=teacher_logp)["opd/reverse_kl"]
    assert last < 0.5 * first


def test_bad_arguments_raise():
    d = Distiller(tiny_model(0), OPTIM)
    with pytest.raises(ValueError, match="sft and/or opd"):
        d.step(lr=0.0)
    with pytest.raises(ValueError, match="go together"):
        d.step(lr=0.0, opd=Sequences([[1]], [[2]]))
    with pytest.raises(ValueError, match="empty"):
        Sequences([[1]], [[]])
