"""Row-local ops of the decoder: RMSNorm and SwiGLU's silu(gate) * up (reference.py defines them; cpu.c
runs each as one pass per row on the CPU, forward and backward)."""
import torch

from ..dispatch import choose


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> x * rsqrt(mean(x^2, -1) + eps) * weight, computed in fp32 and rounded
    once to x's dtype. Differentiable in x and weight."""
    return choose("rms_norm", x)(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """silu(gate) * up, same shapes. inplace (only without autograd): may write over gate's buffer."""
    return choose("swiglu", gate)(gate, up, inplace)
