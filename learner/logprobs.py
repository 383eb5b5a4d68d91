"""Per-token log-probabilities and entropies from logits, with DeepSeek-V3.2's Keep Sampling Mask.

Keep Sampling Mask (DeepSeek-V3.2 §3.1): the rollout engine samples from a top-p / top-k truncated
distribution. Training renormalises pi_theta over the same kept set, so pi_theta and pi_old are
distributions over one action subspace and their ratio is well defined.

Notable choices (departures from a plain `log_softmax(logits)[tokens]`):
- The log-softmax is computed in fp32 whatever the logits' dtype.
- Logits are divided by the sampling temperature first, so logp is the log-probability of the
  distribution the engine actually sampled from.
- Tokens outside the kept set get the fp32 minimum, not -inf. The probabilities are identical
  (exp of it underflows to exactly 0), but 0 * fill = 0, so the entropy and every gradient stay
  finite; a row with nothing kept (padding) gives finite values instead of NaN. A sampled token
  outside its own kept set gets a log-probability near -3.4e38: that is a caller bug, not checked
  here to keep the hot path free of host syncs.
- Memory: we never build the [B, T, V] log-softmax. logp = logit[token] - logsumexp(logits), so the
  forward holds at most one fp32 copy of the logits (none when they are fp32 already, the
  temperature is 1 and there is no mask). The backward of logsumexp builds one softmax.

Run the tests: `pytest tests/learner/test_grpo_loss.py -k logprob`.
"""

from __future__ import annotations

import torch


def _scaled_masked_fp32(logits: torch.Tensor, temperature: float, keep_mask: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits / temperature with kept-out entries at the fp32 minimum, using at most one copy."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if keep_mask is not None and keep_mask.shape != logits.shape:
        raise ValueError(f"keep_mask shape {tuple(keep_mask.shape)} != logits shape {tuple(logits.shape)}")
    owned = logits.dtype != torch.float32
    x = logits.float()  # fp32 for the log-softmax; a fresh copy unless logits are fp32 already
    if temperature != 1.0:
        # in place only on our own copy; division by a constant saves nothing for backward
        x = x.div_(temperature) if owned else x / temperature
        owned = True
    if keep_mask is not None:
        fill = torch.finfo(torch.float32).min
        x = x.masked_fill_(~keep_mask, fill) if owned else x.masked_fill(~keep_mask, fill)
    return x  # [B, T, V] fp32


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(token | prefix) at each position.

    Args:
        logits: [B, T, V] any float dtype; position t predicts tokens[:, t].
        tokens: [B, T] int64, the sampled tokens.
        temperature: the sampling temperature (> 0).
        keep_mask: optional [B, T, V] bool, True for tokens the sampler kept (top-p / top-k).

    Returns:
        [B, T] fp32: logits[token]/temperature - logsumexp over the kept set of logits/temperature.
    """
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} != logits shape without V {tuple(logits.shape[:-1])}")
    x = _scaled_masked_fp32(logits, temperature, keep_mask)  # [B, T, V]
    picked = x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(x, dim=-1)


def token_entropy(
    logits: torch.Tensor,
    temperature: float = 1.0,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropy of pi(. | prefix) at each position, over the kept set.

    Args:
        logits: [B, T, V] any float dtype.
        temperature: the sampling temperature (> 0).
        keep_mask: optional [B, T, V] bool, True for kept tokens.

    Returns:
        [B, T] fp32: H = logsumexp(x) - sum_v softmax(x)_v x_v with x = logits / temperature.
    """
    x = _scaled_masked_fp32(logits, temperature, keep_mask)  # [B, T, V]
    p = torch.softmax(x, dim=-1)  # [B, T, V]; kept-out entries are exactly 0
    return torch.logsumexp(x, dim=-1) - torch.linalg.vecdot(p, x)
