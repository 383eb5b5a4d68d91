"""Per-token decode latency and KV-cache bytes per token of the bench model, sparse vs dense.

    python bench/decode.py [--contexts 1024 4096 16384] [--steps 20] [--batch 1]

The cache is filled with random latent rows (decode cost does not depend on their values), so a
16k context needs no 16k prefill. One JSON line per (context, attention).
"""
import argparse
import json
import statistics
import time

import torch

from dsarl.models import DSAConfig, StaticKVCache, build_model


def kv_bytes_per_token(cfg: DSAConfig, dtype: torch.dtype) -> dict:
    elem = torch.finfo(dtype).bits // 8
    dsa = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * elem
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * elem
    return {"kv_bytes_per_token": dsa, "mha_equivalent_bytes_per_token": mha}


@torch.no_grad()
def time_decode(model, cfg, context: int, attention: str, steps: int, batch: int) -> list[float]:
    cache = StaticKVCache(cfg, batch, context + steps + 8)
    g = torch.Generator().manual_seed(0)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    cache.k_idx.copy_(torch.randn(cache.k_idx.shape, generator=g))
    cache.refresh_blocked()  # k_idx written directly: its kernel-layout mirror too
    cache.lengths.fill_(context)
    tok = torch.randint(0, 256, (batch, 1), generator=g)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        logits = model(tok, cache=cache, attention=attention).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/models/bench.yaml")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--topk", type=int, default=256)
    args = parser.parse_args()
    cfg = DSAConfig.from_file(args.config).replace(index_topk=args.topk, max_position_embeddings=max(args.contexts) + 64)
    model = build_model(cfg, seed=0).eval()
    for context in args.contexts:
        for attention in ("dense", "sparse"):
            times = time_decode(model, cfg, context, attention, args.steps, args.batch)
            print(json.dumps({
                "bench": "decode", "model_params": model.num_params(), "context": context, "attention": attention,
                "index_topk": args.topk if attention == "sparse" else None, "batch": args.batch,
                "ms_per_token_median": 1e3 * statistics.median(times), "ms_per_token_min": 1e3 * min(times),
                **kv_bytes_per_token(cfg, torch.float32), "threads": torch.get_num_threads(),
            }), flush=True)


if __name__ == "__main__":
    main()
