"""Mean entropy of the dense attention distributions: an optional pretraining penalty.

A head that no loss term needs has no reason to concentrate. In the tiny conversion model, two of
layer 0's four heads spread almost uniformly over the whole context (~9% of their mass on the 128
nearest keys, bench/attention_spread.py): a no-op that caps what any top-k selection of that layer can
recall. Large language models park such heads on the first token instead (the attention sink), which
top-k keeps; a model trained for minutes never learns that. Adding `weight * mean entropy` to the
pretraining loss asks every head to concentrate somewhere; heads the LM loss uses keep their pattern.

The entropy is recomputed from each layer's attention input (the model's `collect_aux` output) in the
absorbed form, exactly the distribution the warm-up target and the recall diagnostic use. At 2048
tokens the full [B, H, T, T] recomputation cost ~7x a pretraining step, so `sample_queries` draws the
queries it averages over: an unbiased estimate of the same mean.
"""
import torch

from .indexer_training import absorbed_qkv, head_scores, rope_for_cfg


def sample_queries(query_mask: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """query_mask [B, T] bool -> a mask with at most n of each row's True entries, drawn uniformly."""
    keys = torch.rand(query_mask.shape, generator=generator).masked_fill(~query_mask, 2.0)
    rank = keys.argsort(-1).argsort(-1)
    return query_mask & (rank < n)


def attention_entropy(model, aux, query_mask: torch.Tensor | None = None, chunk: int = 512) -> torch.Tensor:
    """Mean over layers, heads and (masked-in) queries of H(p_t) in nats, differentiable.

    aux: the per-layer IndexerAux of a dense forward with collect_aux=True (positions from 0, keys = the
    same tokens); query_mask [B, T] bool selects the queries counted (None: all), and only those are
    computed. Queries are taken `chunk` at a time so the [H, chunk, T] scores bound the memory."""
    B, T = aux[0].x.shape[:2]
    mask = torch.ones(B, T, dtype=torch.bool) if query_mask is None else query_mask.to(torch.bool).cpu()
    rows = [mask[b].nonzero().flatten() for b in range(B)]
    n_rows = sum(len(r) for r in rows)
    total, count = 0.0, 0
    for layer, a in zip(model.model.layers, aux):
        mla = layer.self_attn
        cos, sin = rope_for_cfg(mla.cfg, a.positions)
        q_abs, kv = absorbed_qkv(mla, a.x, a.c_q, cos, sin)  # [B, T, H, C+R], [B, T, C+R]
        for b in range(B):
            for i in range(0, len(rows[b]), chunk):
                t = rows[b][i:i + chunk].to(q_abs.device)
                logp = head_scores(mla, q_abs[b, t], kv[b], a.positions[b, t], a.positions[b]).log_softmax(-1)
                total = total - (logp.exp() * logp.masked_fill(logp == float("-inf"), 0.0)).sum()  # 0 log 0 = 0
        count += n_rows * mla.n_heads
    return total / max(count, 1)
