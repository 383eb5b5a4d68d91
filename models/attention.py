"""Multi-head Latent Attention with DSA top-k selection (DESIGN.md section 2).

    c_q = RMSNorm(W_dq x);  q = W_uq c_q -> [q_nope ; q_pe]  per head, q_pe with interleaved RoPE
    c_kv = RMSNorm(W_dkv x); k_pe = RoPE(W_kr x), shared by all heads
    k_nope = W_uk c_kv, v = W_uv c_kv per head
Dense prefill/training runs the MHA form (keys and values up-projected per head). Sparse attention and
cached decoding run the absorbed MQA form: q_lat = q_nope W_uk attends to the latent rows
[c_kv ; k_pe] directly, one row shared by every head, and the latent output is mapped by W_uv.
The core maths lives in dsarl.kernels; this module owns parameters and shapes only.
A GLM-5 "shared" layer has no indexer: it attends with the selection of the previous "full" layer,
which the model passes in as `indices`.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from dsarl import kernels

from .config import DSAConfig
from .indexer import LightningIndexer
from .kv_cache import SharedPrefixKV
from .layers import RMSNorm
from .rope import apply_rope_interleaved

# Cached decoding of at most this many new tokens uses the absorbed form even in dense mode.
ABSORBED_DECODE_MAX_T = 16


@dataclass
class IndexerAux:
    """What the indexer losses of the warm-up and sparse stages need from one layer's forward."""

    x: torch.Tensor  # [B, T, hidden] attention input (normed)
    c_q: torch.Tensor  # [B, T, q_lora_rank]
    positions: torch.Tensor  # [B, T]
    indices: torch.Tensor | None  # [B, T, K] selected keys (sparse)
    attn_probs: torch.Tensor | None  # [B, T, K] head-summed attention on the selected keys (sparse)


class MLA(nn.Module):
    def __init__(self, cfg: DSAConfig, has_indexer: bool = True):
        super().__init__()
        self.cfg = cfg
        H, nope, rope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.n_heads, self.nope, self.rope, self.v_dim, self.kv_rank = H, nope, rope, v, cfg.kv_lora_rank
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (nope + v), bias=False)
        self.o_proj = nn.Linear(H * v, cfg.hidden_size, bias=False)
        self.indexer = LightningIndexer(cfg) if has_indexer else None

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        return w[:, : self.nope], w[:, self.nope :]  # [H, nope, C], [H, v, C]

    def _all_visible_fit(self, positions: torch.Tensor) -> bool:
        """True when no query can see more than index_topk keys (positions 0..t are all it sees)."""
        return int(positions.max()) < self.cfg.dense_within

    def forward(self, x, cos, sin, positions, layer_idx: int, cache=None, attention: str = "dense",
                indices: torch.Tensor | None = None, collect_aux: bool = False, doc_mask: torch.Tensor | None = None,
                query_slice: slice | None = None):
        """x [B, T, hidden] -> (out [B, Tq, hidden], indices [B, Tq, K] | None, aux | None).

        `indices`: precomputed top-k selection (e.g. the sampler's) used instead of the indexer's.
        `doc_mask` [B, T, T] bool: packed documents (models/doc_mask.py); dense, cache-free only.
        `query_slice`: only these positions query (Tq of the T); every position still writes its key and
        value (the last layer of a prefill: only the positions whose logits are wanted need an output).
        """
        B, T, _ = x.shape
        kv_cos, kv_sin, kv_positions, xq = cos, sin, positions, x
        if query_slice is not None:
            xq, positions = x[:, query_slice], positions[:, query_slice]
            cos, sin = cos[:, query_slice], sin[:, query_slice]
            indices = None if indices is None else indices[:, query_slice]
        Tq = xq.shape[1]
        c_q = self.q_a_layernorm(self.q_a_proj(xq))  # [B, Tq, q_rank]
        q = self.q_b_proj(c_q).view(B, Tq, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # [B, Tq, H, nope], [B, Tq, H, rope]
        q_pe = apply_rope_interleaved(q_pe, cos, sin)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        kv_new = torch.cat([self.kv_a_layernorm(c_kv), apply_rope_interleaved(k_pe, kv_cos, kv_sin)], dim=-1)
        # dense attention reads no indexer keys (only the warm-up's aux, or a sparse forward, does): a dense
        # rollout or learner skips them, and a dense cache's k_idx rows stay unwritten. Nor does a sparse
        # forward with a given selection, unless a cache keeps the keys for later queries (the learner's
        # completion pass replaying the sampler's selection is the last to read its keys)
        keeps_keys = cache is not None and not isinstance(cache, SharedPrefixKV)
        need_keys = self.indexer is not None and (collect_aux or (attention == "sparse" and (indices is None or keeps_keys)))
        k_idx_new = self.indexer.keys(x, kv_cos, kv_sin) if need_keys else None  # [B, T, d_I]
        if cache is None:
            kv, k_idx, k_pos = kv_new, k_idx_new, kv_positions
        else:
            kv, k_idx, k_pos = cache.update(layer_idx, kv_new, k_idx_new, kv_positions)
        if Tq == 0:  # keys and values written, nothing asks (a KV-only pass: logits_slice=slice(0, 0))
            return x.new_zeros(B, 0, self.o_proj.out_features), indices, None

        sparse = attention == "sparse"
        own_selection = indices is None or self.indexer is None  # a shared layer's indices are a full layer's
        if sparse and own_selection and not collect_aux and self._all_visible_fit(positions):
            # Every query sees at most k keys, so top-k selects them all: sparse attention *is* dense
            # attention here, and the dense kernels are faster ("masked MHA mode" for short sequences).
            sparse = False
            indices = kernels.topk_indices(torch.where(kernels.visibility(positions, k_pos), 0.0, float("-inf")),
                                           self.cfg.index_topk)  # [B, T, K]: the visible keys, -1 padded
        elif sparse and indices is None:
            if self.indexer is None:
                raise ValueError(f"layer {layer_idx} shares an earlier layer's selection: sparse attention needs "
                                 f"its indices")
            q_i, w_i = self.indexer.queries(c_q, xq, cos, sin)
            indices = kernels.indexer_topk(q_i, w_i, k_idx, self.cfg.index_topk, positions, k_pos,
                                           chunk=self.cfg.index_chunk,
                                           k_blocked=None if cache is None else cache.blocked_keys(layer_idx))
        probs = None
        scale = self.cfg.softmax_scale
        if sparse or ((cache is not None or query_slice is not None) and Tq <= ABSORBED_DECODE_MAX_T):
            w_uk, w_uv = self._w_uk_uv()
            q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # absorb W_uk: [B, T, H, C]
            q_abs = torch.cat([q_lat, q_pe], dim=-1)  # [B, T, H, C+R]
            if isinstance(cache, SharedPrefixKV):
                # kv is the pool of the group's prompt rows held once: every query reads it by row number
                rows = cache.pool_rows(indices) if sparse else cache.visible_rows(positions, k_pos)
                o_lat, _, *rest = kernels.sparse_mla_attention(q_abs.flatten(0, 1)[None], kv, rows.flatten(0, 1)[None],
                                                               scale, self.kv_rank, return_probs=collect_aux)
                o_lat = o_lat.view(B, Tq, *o_lat.shape[2:])
                probs = rest[0].view(B, Tq, -1) if rest else None
            elif sparse:
                o_lat, _, *rest = kernels.sparse_mla_attention(q_abs, kv, indices, scale, self.kv_rank,
                                                               return_probs=collect_aux)
                probs = rest[0] if rest else None
            else:
                o_lat, _ = kernels.dense_mla_attention(q_abs, kv, scale, self.kv_rank, positions, k_pos)
            out = torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # [B, T, H, v]
        else:
            if isinstance(cache, SharedPrefixKV):
                kv = cache.per_sequence(kv, T)  # this form up-projects every key of every sequence
            if kv.dtype != q_nope.dtype and not torch.is_autocast_enabled(kv.device.type):
                kv = kv.to(q_nope.dtype)  # an engine's CPU cache holds a bf16 model's keys in fp32 (engine/native.py)
            c_all, pe_all = kv.split([self.kv_rank, self.rope], dim=-1)
            S = kv.shape[1]
            kvb = self.kv_b_proj(c_all).view(B, S, self.n_heads, self.nope + self.v_dim)
            k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)  # [B, S, H, nope], [B, S, H, v]
            k = torch.cat([k_nope, pe_all[:, :, None, :].expand(B, S, self.n_heads, self.rope)], dim=-1)
            qf = torch.cat([q_nope, q_pe], dim=-1)  # [B, T, H, nope+rope]
            # Plain causal attention (SDPA's fused kernel, no mask tensor) whenever queries and keys are the
            # same tokens from position 0: training, and a prefill into an empty cache. Right padding
            # needs no mask there: a real query never sees a later (padded) key.
            same = Tq == S and (cache is None or bool((positions[:, 0] == 0).all()))
            out = kernels.dense_mha_attention(qf, k, v, scale, None if same else positions, None if same else k_pos,
                                              mask=doc_mask)
        aux = IndexerAux(x, c_q, positions, indices, probs) if collect_aux else None
        return self.o_proj(out.reshape(B, Tq, -1)), indices, aux
