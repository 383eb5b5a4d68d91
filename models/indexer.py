"""The lightning indexer (DSA paper eq. 1): a few small ReLU heads that score every past token.

    q^I_{t,j} = W^I_q c_q                  (from MLA's query latent)        [B, T, H_I, d_I]
    k^I_s     = LayerNorm(W^I_k x_s)        (one key per token, all heads)   [B, S, d_I]
    w_{t,j}   = (W^I_w x_t)_j / sqrt(H_I d_I)   (W^I_w kept in fp32)          [B, T, H_I]
    I_{t,s}   = sum_j w_{t,j} ReLU(q^I_{t,j} . k^I_s)
RoPE on the first qk_rope_head_dim dims of q^I and k^I: half-split for DeepSeek-V3.2, interleaved for
GLM-5 (models/rope.py). With `index_fp8`, q^I and k^I are
quantize-dequantized to FP8 e4m3 with one scale per (token, head) / token, as production does; the
Hadamard rotation production applies first is orthonormal and omitted (it only changes FP8 rounding).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsarl.kernels import fp8_quant_dequant

from .config import DSAConfig
from .rope import apply_rope_half, apply_rope_interleaved


class LightningIndexer(nn.Module):
    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.fp8 = cfg.qk_rope_head_dim, cfg.index_fp8
        self.apply_rope = apply_rope_interleaved if cfg.indexer_rope_interleaved else apply_rope_half
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False, dtype=torch.float32)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pe, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)  # RoPE dims come first
        return torch.cat([self.apply_rope(pe, cos, sin), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp8: bool | None = None) -> torch.Tensor:
        """x [B, T, hidden] -> indexer keys [B, T, d_I] (what the KV cache stores for the indexer).

        `fp8` overrides the config's index_fp8 (diagnostics compare the two selections)."""
        n = self.k_norm  # LayerNorm in fp32, whatever the weights' storage dtype
        k = F.layer_norm(self.wk(x).float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps).to(x.dtype)
        k = self._rope(k, cos, sin)
        return fp8_quant_dequant(k) if (self.fp8 if fp8 is None else fp8) else k

    def queries(self, c_q: torch.Tensor, x: torch.Tensor, cos, sin,
                fp8: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """c_q [B, T, q_lora_rank], x [B, T, hidden] -> (q [B, T, H_I, d_I], w [B, T, H_I] fp32)."""
        B, T, _ = x.shape
        q = self.wq_b(c_q).view(B, T, self.n_heads, self.head_dim)  # [B, T, H_I, d_I]
        q = self._rope(q, cos, sin)
        if self.fp8 if fp8 is None else fp8:
            q = fp8_quant_dequant(q)
        w = F.linear(x.float(), self.weights_proj.weight.float()) * (self.n_heads * self.head_dim) ** -0.5  # fp32
        return q, w
