"""On-policy distillation: reverse KL from a student to a teacher, and rejection filtering.

The student generates; the teacher scores the same tokens; the student minimises the reverse KL
KL(pi_s || pi_t) = sum_v pi_s(v) (log pi_s(v) - log pi_t(v)) at every completion position (the
mode-seeking direction used for on-policy distillation). DeepSeek-V3.2 (§3) distils its specialists
into one model but publishes no loss; this module is our choice, not the paper's.

Notable choices:
- `reverse_kl_per_token` is exact over the full vocabulary, in fp32, with the teacher detached:
  gradients reach the student only.
- `sampled_reverse_kl` is the one-sample estimate log pi_s(x) - log pi_t(x) for the sampled token x.
  Its value is unbiased for the reverse KL when x ~ pi_s, but its gradient is not the KL's gradient
  (E[grad log pi_s] = 0): use it detached, as a per-token reward or advantage (-kl) in a policy
  gradient, when only the sampled token's teacher logprob is available.
- `distill_loss` averages over all unmasked tokens of the batch (token level, as `grpo_loss`).
- `rejection_filter` keeps rewards strictly above the threshold: the threshold is the value to beat,
  so with 0/1 rewards keep the correct samples with threshold 0.5 (or 0.0); NaN is never kept.
- Logits at masked positions must be finite (model outputs are); their KL is zeroed, not computed away.

Run the tests: `pytest tests/learner/test_distill_loss.py`.
"""

from __future__ import annotations

import torch


def reverse_kl_per_token(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Exact KL(pi_s || pi_t) at each position over the full vocabulary.

    Args:
        student_logits: [B, T, V] any float dtype (with grad).
        teacher_logits: [B, T, V] any float dtype; detached here.
        mask: [B, T] bool or float, nonzero where the position counts.

    Returns:
        [B, T] fp32: sum_v p_s (log p_s - log p_t), 0 at masked positions.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {tuple(student_logits.shape)}"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape without V {tuple(student_logits.shape[:-1])}")
    log_s = torch.log_softmax(student_logits.float(), dim=-1)  # [B, T, V] fp32 for the log-softmax
    log_t = torch.log_softmax(teacher_logits.detach().float(), dim=-1)  # [B, T, V]
    p_s = log_s.exp()  # [B, T, V]
    # two dot products instead of one on (log_s - log_t): no third [B, T, V] temporary
    kl = torch.linalg.vecdot(p_s, log_s) - torch.linalg.vecdot(p_s, log_t)  # [B, T]
    return torch.where(mask != 0, kl, torch.zeros_like(kl))


def sampled_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """One-sample reverse-KL estimate for the sampled token: log pi_s(x) - log pi_t(x).

    Args:
        student_logp: [B, T] float, log pi_s of the sampled tokens.
        teacher_logp: [B, T] float, log pi_t of the same tokens.

    Returns:
        [B, T] fp32. Unbiased in value for x ~ pi_s; detach it before using it as a reward.
    """
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"teacher_logp shape {tuple(teacher_logp.shape)} != student_logp shape {tuple(student_logp.shape)}"
        )
    return student_logp.float() - teacher_logp.float()


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Mean exact reverse KL over the unmasked tokens; gradient into the student only.

    Args:
        student_logits: [B, T, V] (with grad).
        teacher_logits: [B, T, V].
        mask: [B, T] bool or float, nonzero where the position counts.
        normalizer: the token count to divide by (the global count when the batch is split);
            default the unmasked tokens here.

    Returns:
        0-dim fp32 tensor.
    """
    kl = reverse_kl_per_token(student_logits, teacher_logits, mask)  # [B, T]
    denom = (mask != 0).sum().clamp(min=1) if normalizer is None else normalizer
    return kl.sum() / denom


def rejection_filter(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which samples to keep for distillation or SFT: reward strictly above `threshold`.

    Args:
        rewards: any shape, float.
        threshold: the value to beat.

    Returns:
        bool tensor of rewards' shape; NaN rewards are dropped.
    """
    return rewards > threshold
