"""Indexer losses and training steps of the DSA conversion (reference/DSA.md section 4.1).

Warm-up (dense, eq. 3): the main model is frozen; for every layer and query t the target is the
frozen model's own attention, summed over that layer's heads and L1-normalised,
    p_t = sum_h A_h[t, :] / ||sum_h A_h[t, :]||_1        over all visible keys s <= t,
and the indexer of that layer is trained by mean_t KL(p_t || softmax(I_t)). Both the target and the
scores are built per chunk of queries (memory O(chunk * L), never O(L^2)); each chunk is backpropagated
at once, accumulating the indexer gradient. The indexer keys are computed once per layer; the chunks'
key gradients are summed on a detached leaf and pushed through the key projection at the end.

Sparse (eq. 4): the main model is trained by the LM loss through top-k attention; the indexer only by
mean_t KL(p_{t,S_t} || softmax(I_{t,S_t})) with p_t the sparse attention's own head-summed
probabilities on S_t (DESIGN.md section 5; the TileLang reference does the same). The indexer's
inputs (the layer's normed hidden states and MLA's query latent) are detached, so the indexer gets no
LM gradient and the model no KL gradient.
Departures from the paper: the KL is a mean over queries (the paper sums), and the per-layer losses
are averaged over layers (each layer's indexer has its own parameters, so this only scales them).
"""
from dataclasses import dataclass

import torch

from dsarl import kernels
from dsarl.models.rope import apply_rope_interleaved, rope_for_config

from .pretrain import lm_loss, weighted_lm_loss  # noqa: F401  (lm_loss: the plain mean, re-exported)


@dataclass(frozen=True)
class IndexerStepStats:
    lm_loss: float | None  # sparse stage only
    indexer_kl: float  # mean over layers of mean_t KL
    kl_per_layer: tuple[float, ...]




def indexed_layers(model, aux_list) -> list:
    """(layer, aux) of the layers with an indexer of their own: GLM-5's "shared" layers reuse the
    previous full layer's selection and have nothing to train."""
    return [(layer, aux) for layer, aux in zip(model.model.layers, aux_list) if layer.self_attn.indexer is not None]


def rope_for_cfg(cfg, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> (cos, sin) [B, T, rope/2], as the decoder computes them (YaRN included)."""
    return rope_for_config(cfg, positions)


def absorbed_qkv(mla, x: torch.Tensor, c_q: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention in MQA (absorbed) form from its input: (q [B, T, H, C+R], kv [B, T, C+R]).

    The same projections as MLA.forward; the warm-up target and the recall diagnostic attend with them.
    """
    B, T, _ = x.shape
    q = mla.q_b_proj(c_q).view(B, T, mla.n_heads, mla.nope + mla.rope)
    q_nope, q_pe = q.split([mla.nope, mla.rope], dim=-1)  # [B, T, H, nope], [B, T, H, rope]
    q_pe = apply_rope_interleaved(q_pe, cos, sin)
    c_kv, k_pe = mla.kv_a_proj_with_mqa(x).split([mla.kv_rank, mla.rope], dim=-1)
    kv = torch.cat([mla.kv_a_layernorm(c_kv), apply_rope_interleaved(k_pe, cos, sin)], dim=-1)  # [B, T, C+R]
    w_uk, _ = mla._w_uk_uv()
    q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # [B, T, H, C]
    return torch.cat([q_lat, q_pe], dim=-1), kv


def head_scores(mla, q_abs: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """One sequence's per-head attention logits in absorbed form, -inf where a key is not visible:
    q_abs [t, H, C+R], kv [S, C+R], q_pos [t], k_pos [S] -> [H, t, S] fp32 (differentiable)."""
    s = torch.einsum("thc,sc->hts", q_abs.float(), kv.float()) * mla.cfg.softmax_scale
    return s.masked_fill(~(q_pos[:, None] >= k_pos[None, :]), float("-inf"))


@torch.no_grad()
def dense_target_chunk(mla, q_abs: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, t0: int, t1: int):
    """Head-summed dense attention probabilities of queries t0:t1 over all keys: [B, t1-t0, S] fp32."""
    cfg = mla.cfg
    _, _, probs = kernels.dense_mla_attention(q_abs[:, t0:t1], kv, cfg.softmax_scale, cfg.kv_lora_rank,
                                              positions[:, t0:t1], positions, return_probs=True)
    return probs


def warmup_layer_loss(mla, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor, chunk: int,
                      scale: float = 1.0, backward: bool = True) -> float:
    """Dense KL of one layer, mean over queries; with `backward`, accumulates scale * d(loss) into the
    indexer's .grad chunk by chunk. x, c_q: the layer's (frozen) attention input and query latent."""
    B, T, _ = x.shape
    x, c_q = x.detach(), c_q.detach()
    cos, sin = rope_for_cfg(mla.cfg, positions)
    with torch.no_grad():
        q_abs, kv = absorbed_qkv(mla, x, c_q, cos, sin)
    k_idx = mla.indexer.keys(x, cos, sin)  # [B, S, d_I], in the indexer's graph
    k_leaf = k_idx.detach().requires_grad_(backward)
    total = 0.0
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        target = dense_target_chunk(mla, q_abs, kv, positions, t0, t1)  # [B, c, S]
        q_i, w_i = mla.indexer.queries(c_q[:, t0:t1], x[:, t0:t1], cos[:, t0:t1], sin[:, t0:t1])
        scores = kernels.indexer_scores(q_i, w_i, k_leaf, positions[:, t0:t1], positions)  # [B, c, S]
        loss = kernels.indexer_kl_loss(target, scores) * ((t1 - t0) / T)  # chunk's share of the mean
        if backward:
            (loss * scale).backward()
        total += loss.item()
    if backward:
        k_idx.backward(k_leaf.grad)
    return total


def warmup_losses(model, input_ids: torch.Tensor, chunk: int, backward: bool = True) -> IndexerStepStats:
    """Frozen dense forward, then every layer's dense KL; with `backward` the indexer grads are filled
    (the mean over layers is what is differentiated)."""
    with torch.no_grad():
        out = model(input_ids, attention="dense", collect_aux=True)
    pairs = indexed_layers(model, out.aux)
    n = len(pairs)
    kls = []
    for layer, aux in pairs:
        kls.append(warmup_layer_loss(layer.self_attn, aux.x, aux.c_q, aux.positions, chunk, 1.0 / n, backward))
    return IndexerStepStats(None, sum(kls) / n, tuple(kls))


def sparse_layer_kl(mla, aux, chunk: int) -> torch.Tensor:
    """Restricted KL of one layer (eq. 4) from its sparse forward's aux: mean_t over queries with keys.

    The indexer sees detached inputs; the target is the sparse attention's head-summed probabilities
    on S_t (already detached by the kernel). Only the scores on S_t are computed (K per query, not L):
    at 2048 tokens and k = 128 the full scores were most of a sparse step's indexer cost."""
    x, c_q, positions = aux.x.detach(), aux.c_q.detach(), aux.positions
    cos, sin = rope_for_cfg(mla.cfg, positions)
    k_idx = mla.indexer.keys(x, cos, sin)  # [B, S, d_I]
    B, T = positions.shape
    valid = aux.indices >= 0  # [B, T, K]
    n_queries = valid.any(-1).sum().clamp(min=1)
    total = k_idx.new_zeros((), dtype=torch.float32)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        q_i, w_i = mla.indexer.queries(c_q[:, t0:t1], x[:, t0:t1], cos[:, t0:t1], sin[:, t0:t1])
        idx = aux.indices[:, t0:t1]
        on_s = kernels.indexer_scores_selected(q_i, w_i, k_idx, idx)  # [B, c, K]
        v = valid[:, t0:t1]
        on_s = on_s.masked_fill(~v, float("-inf"))
        n_chunk = v.any(-1).sum()
        if n_chunk == 0:
            continue
        total = total + kernels.indexer_kl_loss(aux.attn_probs[:, t0:t1], on_s, v) * n_chunk
    return total / n_queries


def sparse_losses(model, input_ids: torch.Tensor, targets: torch.Tensor, chunk: int,
                  weights: torch.Tensor | None = None):
    """-> (lm_loss, kl (mean over layers), out): the two losses of the sparse stage, on separate graphs.
    `weights` [B, T]: per-target LM-loss weights (None: the plain mean)."""
    out = model(input_ids, attention="sparse", collect_aux=True)
    loss = weighted_lm_loss(out.logits, targets, weights)
    kls = [sparse_layer_kl(layer.self_attn, aux, chunk) for layer, aux in indexed_layers(model, out.aux)]
    return loss, torch.stack(kls), out
