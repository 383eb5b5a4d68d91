"""Rotary position embeddings in the two layouts DSA uses.

MLA's decoupled RoPE is interleaved (pairs (x0, x1), (x2, x3), ...); the lightning indexer's is
half-split / NeoX style (pairs (x_i, x_{i+d/2})), as in the released DeepSeek-V3.2 code after the
Nov-2025 fix (reference/DSA.md section 2.3).
"""
import torch


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] int -> (cos, sin) [B, T, dim/2] fp32."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, dim/2]
    return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, ..., d] with cos/sin [B, T, d/2]; rotates pairs (x[2i], x[2i+1])."""
    extra = x.dim() - cos.dim()
    cos = cos.view(*cos.shape[:2], *([1] * extra), cos.shape[-1])
    sin = sin.view(*sin.shape[:2], *([1] * extra), sin.shape[-1])
    xf = x.float().unflatten(-1, (-1, 2))  # [..., d/2, 2]
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, ..., d] with cos/sin [B, T, d/2]; rotates pairs (x[i], x[i + d/2])."""
    extra = x.dim() - cos.dim()
    cos = cos.view(*cos.shape[:2], *([1] * extra), cos.shape[-1])
    sin = sin.view(*sin.shape[:2], *([1] * extra), sin.shape[-1])
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(x.dtype)
