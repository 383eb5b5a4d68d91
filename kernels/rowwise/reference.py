"""RMSNorm and SwiGLU's product in plain torch: the definitions the CPU kernels are tested against."""
import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight in fp32 (at least), rounded once to x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(dtype), (x.shape[-1],), weight.to(dtype), eps).to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """silu(gate) * up. inplace: written over gate (no autograd; a rollout's or reference model's forward
    saves two fresh [tokens, intermediate] buffers)."""
    if inplace:
        return F.silu(gate, inplace=True).mul_(up)
    return F.silu(gate) * up
