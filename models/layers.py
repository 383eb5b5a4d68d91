"""Small building blocks of the decoder: RMSNorm and the SwiGLU MLP."""
import torch
import torch.nn as nn

from dsarl import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32, rounded once to x's dtype (kernels/rowwise: one C pass
        # per row on the CPU, where torch runs six ops; torch's fused op elsewhere)
        return kernels.rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        # without autograd (a rollout, a reference forward) the product is written over gate: a 512-token
        # prefill's fresh [tokens, intermediate] buffers per layer (10 MB each) cost more than the maths
        return self.down_proj(kernels.swiglu(gate, up, inplace=not gate.requires_grad))
