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


# Inference batches of this many rows (decode steps, short prompts) run the MLP feature-major on the CPU. In
# loops of the MLP alone it wins from 32 to about 160 rows with two threads (fp32 0.71-0.92x, bf16 0.93-0.96x;
# one thread: no change) and loses below 32; inside a rollout the 64-row decode of the 16-token GRPO step
# gained (generate 0.88x and 0.94x, interleaved), a 32-row decode over 512-token prompts did not (0.98-1.06x).
FEATURE_MAJOR_ROWS = (48, 160)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if FEATURE_MAJOR_ROWS[0] <= rows <= FEATURE_MAJOR_ROWS[1] and x.device.type == "cpu" and not (
                torch.is_grad_enabled() and (x.requires_grad or self.gate_proj.weight.requires_grad)):
            return self._forward_feature_major(x, rows)
        gate, up = self.gate_proj(x), self.up_proj(x)
        # without autograd (a rollout, a reference forward) the product is written over gate: a 512-token
        # prefill's fresh [tokens, intermediate] buffers per layer (10 MB each) cost more than the maths
        return self.down_proj(kernels.swiglu(gate, up, inplace=not gate.requires_grad))

    def _forward_feature_major(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The same maths on transposed activations, W @ x^T. A decode step's few rows make GEMMs that the CPU
        BLAS splits badly over its threads: 64 x 256 x 896 ran at 88 GFLOP/s inside a decode step, 108 as
        896 x 256 x 64. The MLP's three GEMMs and the product stay transposed, so no copy is added."""
        xt = x.reshape(rows, x.shape[-1]).t()
        h = kernels.swiglu(self.gate_proj.weight @ xt, self.up_proj.weight @ xt, inplace=True)  # [inter, rows]
        return (self.down_proj.weight @ h).t().reshape(x.shape)
