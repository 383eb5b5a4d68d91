"""Sampling for the rollout engines: parameters, the per-step sampler, per-sample random numbers.

One step turns next-token logits [B, V] into tokens, their sampling log-probabilities and the kept
set (DeepSeek-V3.2 "keep sampling mask"):
    x      = logits / temperature                     (temperature 0 = greedy, x = logits)
    keep   = top-k largest x, then the smallest prefix of those, by descending probability,
             whose mass reaches top_p (the first token is always kept)
    logp   = log_softmax(x masked to keep)            (the distribution actually sampled from)
    token  = inverse CDF of exp(logp) at u_b          (greedy: argmax x)
So `logp[token]` is what learner/logprobs.py recomputes from the same logits, temperature and mask.

Random numbers are a pure function of (seed, prompt index, sample index, step): a counter-based hash
(splitmix64), one uniform per row and step, never a shared batch generator (STYLE rule 16). A
completion is therefore the same whatever batch size, slot or worker produced it.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # 0 = no top-k truncation
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's eos
    stop_strings: list[str] = field(default_factory=list)  # end when the decoded text contains one
    n: int = 1  # samples per prompt (a GRPO group; they share one prefill)
    seed: int = 0
    return_keep_mask: bool = False  # per step, the kept token ids
    return_indices: bool = False  # per step and layer, the indexer's top-k selection (sparse)
    return_experts: bool = False  # per fed token (prompt too) and MoE layer, the routed experts
    ignore_eos: bool = False  # do not stop at the tokenizer's eos (benchmarks of fixed lengths)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic is the point)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, prompt_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
    """A uint64 stream key per sample from (seed, prompt index, sample index)."""
    k = _splitmix64(np.full(len(prompt_index), seed & _MASK64, dtype=np.uint64))
    k = _splitmix64(k ^ np.asarray(prompt_index, dtype=np.uint64))
    return _splitmix64(k ^ (np.asarray(sample_index, dtype=np.uint64) << np.uint64(32)))


def uniforms(keys: np.ndarray, step: np.ndarray) -> np.ndarray:
    """keys [B] uint64, step [B] int -> [B] float64 in [0, 1): the sample's draw at that step."""
    bits = _splitmix64(keys ^ _splitmix64(np.asarray(step, dtype=np.uint64)))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # 53 random mantissa bits


def keep_mask(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """x [B, V] fp32 scaled logits -> bool [B, V] kept tokens, or None when nothing is truncated."""
    V = x.shape[-1]
    k = top_k if 0 < top_k < V else V
    if k == V and top_p >= 1.0:
        return None
    vals, order = (x.topk(k, dim=-1) if k < V else x.sort(dim=-1, descending=True))  # [B, k]
    keep_sorted = torch.ones_like(vals, dtype=torch.bool)
    if top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)  # renormalised over the top-k set, as vLLM does
        mass_before = probs.cumsum(dim=-1) - probs  # [B, k]
        keep_sorted = mass_before < top_p  # minimal prefix reaching top_p; the first is always kept
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, keep_sorted)


@dataclass
class StepSample:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32, log-probability under the sampled (truncated) distribution
    keep: torch.Tensor | None  # [B, V] bool, None = every token kept


def sample_step(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                u: torch.Tensor | None) -> StepSample:
    """logits [B, V] -> one token per row. u [B] uniforms in [0, 1) (ignored when greedy)."""
    x = logits.float()  # fp32 for the softmax and the CDF
    if temperature > 0:
        x = x / temperature
    keep = keep_mask(x, top_k, top_p)
    masked = x if keep is None else x.masked_fill(~keep, float("-inf"))
    logp = torch.log_softmax(masked, dim=-1)  # [B, V]
    if temperature == 0:
        tokens = masked.argmax(dim=-1)
    else:
        cdf = logp.exp().cumsum(dim=-1)  # [B, V]
        total = cdf[:, -1:]  # [B, 1]
        target = (u.to(cdf.device, torch.float64)[:, None] * total.double()).float()  # [B, 1]
        target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # strictly < total
        # first token whose cumulative mass exceeds u; zero-mass tokens never satisfy that first
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=x.shape[-1] - 1)
    return StepSample(tokens, logp.gather(-1, tokens[:, None]).squeeze(-1), keep)
