"""How concentrated a checkpoint's dense attention is, per layer and head: the bound on indexer recall.

    python bench/attention_spread.py CHECKPOINT [--topk 128] [--filler random|words] [--queries 1024 1536]

One JSON line per layer, on one 2048-token passkey document (data/retrieval_docs.py): for each head the
mass of each query's `topk` heaviest keys and the effective number of keys it attends to (exp of the
entropy), averaged over the queries in [--queries); and the head-summed bound, the top-k mass of the
heads' summed distribution: what DSA's warm-up target is and the best recall any indexer can reach in
that layer (learner/diagnostics.py oracle_recall). A layer of near-uniform heads caps recall there.
"""
import argparse
import json

import torch

from dsarl.data.retrieval_docs import packed_lm_batch_with_mask
from dsarl.learner.diagnostics import oracle_recall
from dsarl.learner.indexer_training import absorbed_qkv, head_scores, rope_for_cfg
from dsarl.models import from_pretrained


@torch.no_grad()
def layer_spread(mla, aux, topk: int, q0: int, q1: int) -> dict:
    cfg = mla.cfg
    cos, sin = rope_for_cfg(cfg, aux.positions)
    q_abs, kv = absorbed_qkv(mla, aux.x, aux.c_q, cos, sin)
    p = head_scores(mla, q_abs[0, q0:q1], kv[0], aux.positions[0, q0:q1], aux.positions[0]).softmax(-1)  # [H, T, S]
    k = min(topk, p.shape[-1])
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [H, T]
    return {"topk_mass_per_head": [round(float(v), 3) for v in oracle_recall(p, k).mean(-1)],
            "effective_keys_per_head": [round(float(v)) for v in entropy.exp().mean(-1)],
            "head_summed_bound": round(float(oracle_recall(p.sum(0, keepdim=True), k).mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--topk", type=int, default=128)
    ap.add_argument("--filler", default="random", choices=["random", "words"])
    ap.add_argument("--queries", type=int, nargs=2, default=[1024, 1536])
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    model, tok = from_pretrained(args.checkpoint)
    model.eval()
    kw = {"context_len": 1990, "min_context_len": 1900, "n_needles": 16, "value_len": 2, "filler": args.filler}
    ids, _, _ = packed_lm_batch_with_mask(tok, "passkey_multi_query", kw, 1, 2047, args.seed, 0, pack=False)
    q0, q1 = args.queries
    with torch.no_grad():
        out = model(ids, attention="dense", collect_aux=True)
    for i, (layer, aux) in enumerate(zip(model.model.layers, out.aux)):
        print(json.dumps({"bench": "attention_spread", "checkpoint": args.checkpoint, "layer": i, "topk": args.topk,
                          "queries": [q0, q1], "filler": args.filler,
                          **layer_spread(layer.self_attn, aux, args.topk, q0, q1)}))


if __name__ == "__main__":
    main()
