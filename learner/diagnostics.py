"""Indexer diagnostics logged by the conversion stages (no gradients).

- attention-mass recall: for query t, the share of its dense head-summed attention (L1-normalised over
  the visible keys) that falls inside the selected set S_t. 1 means the top-k keeps every key the
  dense model attends to. Reported over all queries and over "long" queries only (more than k
  visible keys: the ones where selection can actually drop something).
- oracle recall: the same share for the best possible S_t, the query's own k heaviest keys: the bound
  any indexer has. When recall is close to it, the indexer is as good as selection can be and what is
  missing is attention spread over more than k keys.
- fp8 top-k overlap: |S_t(fp8 indexer) n S_t(fp32 indexer)| / |S_t(fp32 indexer)|, the FP8 check of
  DESIGN.md section 10 (>= 0.99).
All are computed per chunk of queries, so memory is O(chunk * L).
"""
from dataclasses import dataclass

import torch

from dsarl import kernels

from .indexer_training import absorbed_qkv, dense_target_chunk, rope_for_cfg


@dataclass(frozen=True)
class LayerDiagnostics:
    recall: float  # mean over queries of dense attention mass inside S_t
    recall_long: float  # the same over queries with more than k visible keys (nan if none)
    recall_oracle: float  # mean over queries of the mass of the k heaviest keys: the bound on recall
    fp8_overlap: float  # mean top-k overlap of the FP8 and full-precision indexer


def mass_recall(dense_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """dense_probs [B, T, S] non-negative (head-summed), indices [B, T, K] (-1 = none) -> [B, T] recall."""
    p = dense_probs / dense_probs.sum(-1, keepdim=True).clamp(min=1e-30)
    on_s = p.gather(-1, indices.clamp(min=0).long()).masked_fill(indices < 0, 0.0)  # [B, T, K]
    return on_s.sum(-1)


def oracle_recall(dense_probs: torch.Tensor, topk: int) -> torch.Tensor:
    """dense_probs [B, T, S] non-negative -> [B, T]: the share of each row's mass on its topk largest keys."""
    p = dense_probs / dense_probs.sum(-1, keepdim=True).clamp(min=1e-30)
    return p.topk(min(topk, p.shape[-1]), dim=-1).values.sum(-1)


def topk_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b [B, T, K] index sets (-1 = none) -> [B, T] |a n b| / |b| (1 where b is empty)."""
    same = (a[..., :, None] == b[..., None, :]) & (b[..., None, :] >= 0)  # [B, T, K, K]
    hits = same.any(-2).sum(-1).float()  # members of b found in a
    size = (b >= 0).sum(-1).float()
    return torch.where(size > 0, hits / size.clamp(min=1), torch.ones_like(size))


def _selection(indexer, c_q, x, k_idx_fn, cos, sin, positions, t0, t1, topk, fp8):
    q_i, w_i = indexer.queries(c_q[:, t0:t1], x[:, t0:t1], cos[:, t0:t1], sin[:, t0:t1], fp8=fp8)
    return kernels.indexer_topk(q_i, w_i, k_idx_fn(fp8), topk, positions[:, t0:t1], positions, chunk=t1 - t0)


@torch.no_grad()
def layer_diagnostics(mla, aux, topk: int, chunk: int, indices: torch.Tensor | None = None) -> LayerDiagnostics:
    """Diagnostics of one layer from its forward's aux (x, c_q, positions). `indices`: the selection
    to score (default: the layer's indexer at `topk` with the config's precision)."""
    x, c_q, positions = aux.x, aux.c_q, aux.positions
    cos, sin = rope_for_cfg(mla.cfg, positions)
    q_abs, kv = absorbed_qkv(mla, x, c_q, cos, sin)
    keys = {fp8: mla.indexer.keys(x, cos, sin, fp8=fp8) for fp8 in (False, True)}
    B, T = positions.shape
    recalls, oracles, overlaps = [], [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        full = _selection(mla.indexer, c_q, x, keys.get, cos, sin, positions, t0, t1, topk, False)
        low = _selection(mla.indexer, c_q, x, keys.get, cos, sin, positions, t0, t1, topk, True)
        sel = {False: full, True: low}[mla.cfg.index_fp8] if indices is None else indices[:, t0:t1]
        target = dense_target_chunk(mla, q_abs, kv, positions, t0, t1)
        recalls.append(mass_recall(target, sel))
        oracles.append(oracle_recall(target, topk))
        overlaps.append(topk_overlap(low, full))
    recall = torch.cat(recalls, dim=1)  # [B, T]
    n_visible = (positions + 1)  # keys 0..t are visible to query t (packed training sequences)
    long = n_visible > topk
    recall_long = float(recall[long].mean()) if long.any() else float("nan")
    return LayerDiagnostics(float(recall.mean()), recall_long, float(torch.cat(oracles, dim=1).mean()),
                            float(torch.cat(overlaps, dim=1).mean()))


def model_diagnostics(model, aux_list, topk: int, chunk: int, indices_list=None) -> dict[str, float]:
    """Mean over layers of each diagnostic, plus per-layer recall: a flat dict for MetricsLogger."""
    # GLM-5's "shared" layers have no indexer of their own: they reuse the previous full layer's selection
    per_layer = [layer_diagnostics(layer.self_attn, aux, topk, chunk, None if indices_list is None else idx)
                 for layer, aux, idx in zip(model.model.layers, aux_list, indices_list or [None] * len(aux_list))
                 if layer.self_attn.indexer is not None]
    n = len(per_layer)
    out = {
        "recall": sum(d.recall for d in per_layer) / n,
        "recall_long": sum(d.recall_long for d in per_layer) / n,
        "recall_oracle": sum(d.recall_oracle for d in per_layer) / n,
        "fp8_topk_overlap": sum(d.fp8_overlap for d in per_layer) / n,
    }
    out.update({f"recall/layer{i}": d.recall for i, d in enumerate(per_layer)})
    # per layer bound: a layer whose heads spread attention over many keys caps recall at any indexer
    out.update({f"recall_oracle/layer{i}": d.recall_oracle for i, d in enumerate(per_layer)})
    return out
