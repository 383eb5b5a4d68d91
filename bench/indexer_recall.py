"""A checkpoint's indexer against its dense attention, on held-out passkey documents.

    python bench/indexer_recall.py CHECKPOINT [--docs 16] [--topk 128] [--seed 1000] [--filler random]

The warm-up logs these diagnostics on one training document per logged step, so the logged number
moves by a point or two from step to step. This averages them over `--docs` documents of the
warm-up's distribution (2048 tokens, 16 needles, 1900..1990 bytes) drawn with a seed no stage trains
on: recall of the dense head-summed attention mass by the indexer's top-k (the issue's number), the
oracle bound (the k heaviest keys), fp8/fp32 top-k overlap, each per layer and meaned over layers
and queries. One JSON line.
"""
import argparse
import json

import torch

from dsarl.data.retrieval_docs import packed_lm_batch_with_mask
from dsarl.learner.diagnostics import model_diagnostics
from dsarl.models import from_pretrained


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--topk", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1000, help="documents: seeded draws no config trains on")
    ap.add_argument("--filler", default="random", choices=["random", "words"])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = from_pretrained(args.checkpoint)
    model.eval()
    kw = {"context_len": 1990, "min_context_len": 1900, "n_needles": 16, "value_len": 2, "filler": args.filler}
    rows = []
    with torch.no_grad():
        for doc in range(args.docs):
            ids, _, _ = packed_lm_batch_with_mask(tok, "passkey_multi_query", kw, 1, args.seq_len, args.seed, doc,
                                                  pack=False)
            aux = model(ids[:, :-1], attention="dense", collect_aux=True).aux
            rows.append(model_diagnostics(model, aux, args.topk, args.chunk))
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]}
    spread = [r["recall"] for r in rows]
    print(json.dumps({"bench": "indexer_recall", "checkpoint": args.checkpoint, "docs": args.docs,
                      "topk": args.topk, "seq_len": args.seq_len, "seed": args.seed, "filler": args.filler,
                      "recall_min_doc": round(min(spread), 4), "recall_max_doc": round(max(spread), 4), **mean}))


if __name__ == "__main__":
    main()
