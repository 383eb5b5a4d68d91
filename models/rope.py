"""Rotary position embeddings: the two layouts DSA uses, and the frequencies (plain or YaRN).

MLA's decoupled RoPE is interleaved (pairs (x0, x1), (x2, x3), ...). DeepSeek-V3.2's lightning indexer
uses half-split / NeoX pairs (x_i, x_{i+d/2}), as in the released V3.2 code after the Nov-2025 fix
(reference/DSA.md section 2.3); GLM-5's indexer keeps the interleaved pairs (its checkpoints were trained
so: `indexer_rope_interleave`, default true, in GLM-5's config; transformers' glm_moe_dsa does the same).

Frequencies come from `rope_parameters` (Hugging Face's key; the legacy `rope_scaling` maps onto it):
- "default": inv_freq_i = theta^(-2i/d).
- "yarn" (YaRN, arXiv:2309.00071, as DeepSeek-V3 uses it): frequencies whose wavelength fits the original
  context many times (>= beta_fast rotations) are kept, those that rotate fewer than beta_slow times are
  interpolated by 1/factor, with a linear ramp between (dims rounded outward when `truncate`, the
  default, as DeepSeek's find_correction_range does). Two magnitude corrections:
  cos/sin are multiplied by attention_factor = m(factor, mscale) / m(factor, mscale_all_dim) (1 when the two
  are equal, as in every DeepSeek config), and the attention softmax scale by m(factor, mscale_all_dim)^2,
  with m(s, a) = 0.1 a ln(s) + 1 (DeepSeek's `softmax_scale * mscale * mscale`). The indexer's score scale
  gets no mscale (it only ranks keys).
"""
import functools
import math

import torch

ROPE_TYPES = ("default", "yarn")


def normalize_rope_parameters(rope: dict | None, rope_theta: float, max_position_embeddings: int) -> dict:
    """A config's rope_parameters / rope_scaling (either may be None) -> one dict with rope_type and rope_theta.

    Raises ValueError naming the field for a type we do not implement."""
    out = dict(rope or {})
    if "type" in out:  # legacy rope_scaling spelling
        out.setdefault("rope_type", out.pop("type"))
    out.setdefault("rope_type", "default")
    out.setdefault("rope_theta", rope_theta)
    kind = out["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "yarn":
        out.setdefault("original_max_position_embeddings", max_position_embeddings)
        if out.get("factor") is None:
            out["factor"] = max_position_embeddings / out["original_max_position_embeddings"]
    return out


def yarn_mscale(factor: float, mscale: float | None = 1.0) -> float:
    """YaRN's magnitude correction m(s, a) = 0.1 a ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * (mscale if mscale is not None else 1.0) * math.log(factor) + 1.0


def _yarn_inv_freq(rope: dict, dim: int) -> torch.Tensor:
    base, factor = rope["rope_theta"], rope["factor"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1
    original = rope["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times into `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [d/2]: 0 keep .. 1 interpolate
    extrapolated = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [d/2]
    return extrapolated * (1 - ramp) + (extrapolated / factor) * ramp


def rope_inv_freq(rope: dict, dim: int) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [dim/2] fp32, attention_factor multiplying cos and sin)."""
    if rope["rope_type"] == "default":
        return rope["rope_theta"] ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    factor = rope["factor"]
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return _yarn_inv_freq(rope, dim), float(attention_factor)


def softmax_scale_factor(rope: dict) -> float:
    """What YaRN multiplies MLA's softmax scale by: m(factor, mscale_all_dim)^2 (1 without YaRN)."""
    if rope["rope_type"] == "default" or not rope.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain RoPE: positions [B, T] int -> (cos, sin) [B, T, dim/2] fp32."""
    return rope_cos_sin(positions, {"rope_type": "default", "rope_theta": theta}, dim)


@functools.lru_cache(maxsize=64)
def _cached_inv_freq(rope_items: tuple, dim: int) -> tuple[torch.Tensor, float]:
    return rope_inv_freq(dict(rope_items), dim)


def rope_cos_sin(positions: torch.Tensor, rope: dict, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] int, normalized rope_parameters -> (cos, sin) [B, T, dim/2] fp32, attention_factor folded in."""
    # the frequencies depend on the config alone: computed once, not in every forward (a decode step's
    # rope was ~10 small ops, most of them this)
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))
    try:
        inv_freq, attention_factor = _cached_inv_freq(key, dim)
    except TypeError:  # an unhashable value in rope_parameters: compute it here
        inv_freq, attention_factor = rope_inv_freq(rope, dim)
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, dim/2]
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rope_for_config(cfg, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's (cos, sin) [B, T, qk_rope_head_dim/2] for positions [B, T]."""
    return rope_cos_sin(positions, cfg.rope, cfg.qk_rope_head_dim)


def _broadcast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    extra = x.dim() - cos.dim()
    cos = cos.view(*cos.shape[:2], *([1] * extra), cos.shape[-1])
    sin = sin.view(*sin.shape[:2], *([1] * extra), sin.shape[-1])
    return cos, sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, ..., d] with cos/sin [B, T, d/2]; rotates pairs (x[2i], x[2i+1])."""
    cos, sin = _broadcast(x, cos, sin)
    # The pair (a, b) as the complex number a + ib times cos + i sin: (a cos - b sin, a sin + b cos) in one
    # op where written out it took six (2-4x faster forward and backward; DeepSeek's own form). Within one
    # rounding of the written-out form: the complex multiply may fuse a multiply and an add.
    xf = x.float().unflatten(-1, (-1, 2))  # [..., d/2, 2]
    if xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()  # a complex view needs pairs aligned to whole complex numbers
    rotated = torch.view_as_complex(xf) * torch.complex(cos, sin)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, ..., d] with cos/sin [B, T, d/2]; rotates pairs (x[i], x[i + d/2])."""
    cos, sin = _broadcast(x, cos, sin)
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(x.dtype)
