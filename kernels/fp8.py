"""FP8 e4m3 quantize-dequantize with one scale per row, as the DSA indexer uses it.

Scale `s = max(amax, 1e-4) / 448` per row (token, or token and head); codes `clamp(x / s, +-448)`
rounded to float8_e4m3fn. DeepSeek-V3.2's `act_quant` optionally rounds s up to a power of two
(`scale_fmt="ue8m0"`); `pow2_scale=True` does the same.
"""
import torch

FP8_MAX = 448.0


def fp8_quantize(x: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes [..., D] float8_e4m3fn, scale [...] fp32), x ~= codes * scale."""
    amax = x.detach().abs().amax(dim=-1).float().clamp(min=1e-4)
    scale = amax / FP8_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    codes = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_quant_dequant(x: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    """Simulates the indexer's FP8 path in x's dtype; the gradient passes straight through."""
    codes, scale = fp8_quantize(x, pow2_scale)
    y = (codes.float() * scale[..., None]).to(x.dtype)
    return x + (y - x).detach()  # straight-through estimator: FP8 rounding has no useful gradient
