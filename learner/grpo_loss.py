"""The GRPO policy loss of DeepSeek-V3.2 (§3.1, eqs. 7-9), with truncated importance sampling.

Per token t of sequence i, with r = pi_theta / pi_old = exp(logp - old_logp) and A_i the sequence's
advantage:

    loss_t = w_t * ( -min(r A_i, clip(r, 1 - clip_low, 1 + clip_high) A_i) * M_i  +  beta * KL_t )

aggregated over the unmasked tokens. The loss is the negated objective, so minimise it.

Departures from the paper's formula, and choices it leaves open:
- Aggregation defaults to DAPO token-level: sum over every unmasked token of the batch / the number
  of unmasked tokens. The paper's 1/G sum_i 1/|o_i| sum_t is `aggregation="sequence"`; it averages
  over the non-empty sequences.
- Asymmetric clipping (DAPO clip-higher): clip_low = 0.2, clip_high = 0.28 by default; the paper
  writes one epsilon.
- KL estimator "unbiased" is eq. (7): (pi_theta / pi_old) * k3 with k3 = pi_ref/pi - log(pi_ref/pi) - 1.
  The ratio is NOT detached. Reason: for a token x ~ pi_old the gradient of (pi/pi_old) k3 is
  (pi/pi_old) (log pi - log pi_ref) grad log pi, whose expectation is exactly grad KL(pi || pi_ref);
  with the ratio detached the expectation becomes -sum_x pi_ref grad log pi, the gradient of the
  forward KL(pi_ref || pi) instead. The value is unbiased for KL(pi || pi_ref) either way.
  "k3" (the value is unbiased only when pi_old = pi_theta) and "k1" = log(pi/pi_ref) are options.
- beta = 0 (the default, as the paper suggests for mathematics) skips the reference entirely:
  ref_logp may be None and no KL metric is reported.
- Off-policy sequence masking (eqs. 8-9): M_i = 0 when A_i < 0 and the mean over the sequence's
  tokens of (log pi_sampler - logp) > delta. The paper's pi_old in eq. (9) is the inference engine's
  sampling distribution, so the statistic uses sampler_logp whenever it is given (it then catches
  both staleness and the training/inference mismatch), and old_logp only when it is not. The PPO
  ratio keeps the learner's pi_old: with one optimizer step per batch old_logp = logp, and a mask
  statistic on old_logp would be exactly 0, masking nothing. The decision uses logp detached. As in
  eq. (8) M multiplies the surrogate only, not the KL term. delta = None switches it off (delta is
  not published).
- Truncated importance sampling (not in the paper; TIS as in verl/TRL): when old_logp is the
  learner's recompute and sampler_logp the rollout engine's, every token's loss is weighted by
  w = exp(old_logp - sampler_logp), detached, at token level or sequence level (the geometric mean
  over the sequence's tokens, exp(mean(old_logp - sampler_logp))). "truncate" uses min(w, cap);
  "mask" uses w where w <= cap and 0 above it (the rejected tokens / sequences stay in the
  denominator). The weight multiplies the KL term too: it corrects the distribution every sample-based
  term was drawn from, and with it eq. (7)'s estimate is (pi/sampler) k3, unbiased again.
- Masked tokens (padding, prompt) and off-policy-masked sequences contribute exactly zero gradient;
  inputs at masked positions are replaced by 0 first, so padding may hold anything, even inf/NaN.
- `normalizer` lets the caller pass the global token (or sequence) count when one batch is split
  into micro-batches or ranks, so the summed gradients equal the whole-batch loss's.

Run the tests: `pytest tests/learner/test_grpo_loss.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3", "unbiased"]
Aggregation = Literal["token", "sequence"]
TISLevel = Literal["none", "token", "sequence"]
TISMode = Literal["truncate", "mask"]


@dataclass(frozen=True)
class GRPOLossConfig:
    """Argument bundle for `grpo_loss` (built by the learner from its config, not loaded here)."""

    clip_low: float = 0.2  # ratio lower bound is 1 - clip_low
    clip_high: float = 0.28  # ratio upper bound is 1 + clip_high (DAPO clip-higher)
    beta: float = 0.0  # KL-to-reference weight; 0 skips the reference model
    kl_estimator: KLEstimator = "unbiased"  # DeepSeek-V3.2 eq. (7)
    aggregation: Aggregation = "token"  # "token": DAPO; "sequence": the paper's 1/|o_i|
    offpolicy_delta: float | None = None  # eq. (8) threshold; None = no off-policy masking
    tis_level: TISLevel = "none"  # importance weights old/sampler per token or per sequence
    tis_cap: float = 2.0  # weights above this are truncated or masked
    tis_mode: TISMode = "truncate"  # "truncate": min(w, cap); "mask": 0 above cap

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.kl_estimator not in _KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(_KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.aggregation not in _AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {sorted(_AGGREGATIONS)}, got {self.aggregation!r}")
        if self.tis_level not in ("none", *_TIS_LOG_WEIGHTS):
            raise ValueError(f"tis_level must be 'none', 'token' or 'sequence', got {self.tis_level!r}")
        if self.tis_mode not in _TIS_CAPS:
            raise ValueError(f"tis_mode must be one of {sorted(_TIS_CAPS)}, got {self.tis_mode!r}")
        if not self.tis_cap > 0.0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")


# ---- KL estimators: per-token estimate of KL(pi_theta || pi_ref) for a token sampled from pi_old.


def _kl_k1(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def _kl_k3(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_ref_over_pi = ref_logp - logp
    return torch.exp(log_ref_over_pi) - log_ref_over_pi - 1.0


def _kl_unbiased(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    # eq. (7); the ratio keeps its gradient (see the module docstring)
    return torch.exp(logp - old_logp) * _kl_k3(logp, old_logp, ref_logp)


_KL_ESTIMATORS = {"k1": _kl_k1, "k3": _kl_k3, "unbiased": _kl_unbiased}


# ---- Aggregation of a [B, T] per-token loss (already zero at masked tokens) to a scalar.


def _aggregate_token(per_token: torch.Tensor, mask: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    denom = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
    return per_token.sum() / denom


def _aggregate_sequence(per_token: torch.Tensor, mask: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    lengths = mask.sum(dim=1)  # [B]
    seq_means = per_token.sum(dim=1) / lengths.clamp(min=1.0)  # [B]; empty rows are 0
    denom = (lengths > 0).sum().clamp(min=1) if normalizer is None else normalizer
    return seq_means.sum() / denom


_AGGREGATIONS = {"token": _aggregate_token, "sequence": _aggregate_sequence}


# ---- Truncated importance sampling: log-weights at a level, then a cap policy.


def _tis_log_weight_token(log_w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-weights, and the [B, T] mask of the units they count over."""
    return log_w, mask


def _tis_log_weight_sequence(log_w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log of the per-sequence geometric mean weight, broadcast to [B, 1]; units are sequences."""
    lengths = mask.sum(dim=1, keepdim=True)  # [B, 1]
    seq = (log_w * mask).sum(dim=1, keepdim=True) / lengths.clamp(min=1.0)  # [B, 1]
    return seq, (lengths > 0).float()


_TIS_LOG_WEIGHTS = {"token": _tis_log_weight_token, "sequence": _tis_log_weight_sequence}


def _tis_truncate(w: torch.Tensor, cap: float) -> torch.Tensor:
    return w.clamp(max=cap)


def _tis_mask(w: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.where(w <= cap, w, torch.zeros_like(w))


_TIS_CAPS = {"truncate": _tis_truncate, "mask": _tis_mask}


def _offpolicy_keep(
    logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    delta: float | None
) -> torch.Tensor:
    """[B] float, 0 for sequences masked by eqs. (8)-(9), 1 otherwise. behaviour_logp: the sampler's."""
    if delta is None:
        return torch.ones_like(advantages)
    lengths = mask.sum(dim=1).clamp(min=1.0)  # [B]
    mean_log_behaviour_over_pi = ((behaviour_logp - logp.detach()) * mask).sum(dim=1) / lengths  # [B]
    return (~((advantages < 0) & (mean_log_behaviour_over_pi > delta))).float()


def _zero_masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros_like(x))


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, sampler_logp, cfg: GRPOLossConfig) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "sampler_logp": sampler_logp}
    for name, t in named.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is required when beta > 0 (beta={cfg.beta})")
    if cfg.tis_level != "none" and sampler_logp is None:
        raise ValueError(f"sampler_logp is required when tis_level={cfg.tis_level!r}")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    sampler_logp: torch.Tensor | None = None,
    cfg: GRPOLossConfig = GRPOLossConfig(),
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss (negated objective) and its metrics.

    Args:
        logp: [B, T] float, log pi_theta of the sampled tokens (with grad).
        old_logp: [B, T] float, log pi_old (no grad needed): the sampler's logprobs (paper) or the
            learner's recompute before the update (then pass sampler_logp for TIS).
        advantages: [B] float, one per sequence.
        mask: [B, T] bool or float, nonzero for completion tokens that count (values are not weights).
        ref_logp: [B, T] float, log pi_ref; required only when cfg.beta > 0.
        sampler_logp: [B, T] float, the rollout engine's logprobs; required when cfg.tis_level != "none".
            When given, the off-policy mask (eq. 9) is computed from it instead of old_logp.
        cfg: loss settings.
        normalizer: the token count ("token") or non-empty sequence count ("sequence") to divide by;
            default the count in this batch.

    Returns:
        (loss, metrics): loss a 0-dim fp32 tensor; metrics a dict of Python floats.
    """
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, sampler_logp, cfg)
    keep = mask != 0  # [B, T] bool
    mask = keep.float()  # [B, T]
    # Zero every input at masked positions first: padding may hold anything (inf, NaN), and a masked
    # logp then gets exactly zero gradient through `where` with no 0 * inf in the backward.
    logp = _zero_masked(logp.float(), keep)
    old_logp = _zero_masked(old_logp.float().detach(), keep)
    ref_logp = None if ref_logp is None else _zero_masked(ref_logp.float().detach(), keep)
    sampler_logp = None if sampler_logp is None else _zero_masked(sampler_logp.float().detach(), keep)
    adv = advantages.float().detach()

    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv_t = adv.unsqueeze(1)  # [B, 1]
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    surrogate = torch.minimum(ratio * adv_t, clipped * adv_t)  # [B, T]
    behaviour_logp = sampler_logp if sampler_logp is not None else old_logp  # eq. (9)'s pi_old
    keep_seq = _offpolicy_keep(logp, behaviour_logp, adv, mask, cfg.offpolicy_delta)  # [B]
    per_token = -surrogate * keep_seq.unsqueeze(1)  # [B, T]

    kl = None
    if cfg.beta > 0:
        kl = _KL_ESTIMATORS[cfg.kl_estimator](logp, old_logp, ref_logp)  # [B, T]
        per_token = per_token + cfg.beta * kl

    tis = None
    if cfg.tis_level != "none":
        tis = _tis_weights(old_logp, sampler_logp, mask, cfg)
        per_token = per_token * tis[0]

    per_token = per_token * mask
    loss = _AGGREGATIONS[cfg.aggregation](per_token, mask, normalizer)

    metrics = _metrics(ratio, adv_t, mask, keep_seq, kl, tis, logp, old_logp, sampler_logp, cfg)
    return loss, metrics


def _tis_weights(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cfg: GRPOLossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(capped weight broadcastable to [B, T], raw weight per unit, unit mask), all detached."""
    log_w, units = _TIS_LOG_WEIGHTS[cfg.tis_level]((old_logp - sampler_logp) * mask, mask)
    raw = torch.exp(log_w)  # [B, T] or [B, 1]
    return _TIS_CAPS[cfg.tis_mode](raw, cfg.tis_cap), raw, units


@torch.no_grad()
def _metrics(ratio, adv_t, mask, keep_seq, kl, tis, logp, old_logp, sampler_logp, cfg) -> dict[str, float]:
    n_tok = mask.sum().clamp(min=1.0)

    def token_mean(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * mask).sum() / n_tok

    values = {
        "clip_frac_low": token_mean((adv_t < 0) & (ratio < 1.0 - cfg.clip_low)),
        "clip_frac_high": token_mean((adv_t > 0) & (ratio > 1.0 + cfg.clip_high)),
        "ratio_mean": token_mean(ratio),
        "offpolicy_masked_seqs": (1.0 - keep_seq).sum(),
        "offpolicy_masked_frac": (1.0 - keep_seq).mean(),
        "tokens": mask.sum(),
        "sequences": (mask.sum(dim=1) > 0).sum(),
    }
    if kl is not None:
        values["kl_mean"] = token_mean(kl)
    if tis is not None:
        _, raw, units = tis
        n_units = units.sum().clamp(min=1.0)
        values["tis_weight_mean"] = (raw * units).sum() / n_units
        values["tis_capped_frac"] = ((raw > cfg.tis_cap).float() * units).sum() / n_units
    if sampler_logp is not None:
        for name, ref in (("logp", logp), ("old_logp", old_logp)):
            diff = (ref - sampler_logp).abs()  # zero at masked positions
            values[f"{name}_sampler_absdiff_max"] = diff.max()
            values[f"{name}_sampler_absdiff_mean"] = diff.sum() / n_tok
    floats = torch.stack([v.float().reshape(()) for v in values.values()]).tolist()  # one host sync
    return dict(zip(values, floats))
