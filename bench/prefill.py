"""Prefill / training cost of DSA against dense attention at long context, on the bench model.

    python bench/prefill.py [--lengths 4096 8192 16384] [--reps 2] [--quick] [--profile]

Two scopes, both in forward and in forward+backward, sparse (index_topk 256) vs dense:
- `layer`: one attention layer (MLA): sparse = indexer scores + top-k selection + sparse MLA core
  attention (absorbed form); dense = dense MLA attention (MHA form through SDPA), same projections;
- `model`: the whole bench model, logits and LM loss.
One JSON line per (scope, length, attention, pass), with the sparse/dense ratio on the sparse line and
the backend each kernel op ran on (`kernels`, from kernels/dispatch.py; DSARL_KERNELS forces one).
`--profile` adds the top operators (torch.profiler, self CPU time) of the sparse and dense layer's
forward+backward at the largest length. `--quick`: 2048 tokens, one rep.
"""
import argparse
import json
import statistics
import time

import torch

from dsarl.kernels import dispatch
from dsarl.models import DSAConfig, build_model
from dsarl.models.rope import rope_for_config


def layer_fn(model, L: int, attention: str, backward: bool, seed: int = 0):
    """A closure running layer 0's attention on random normed inputs [1, L, hidden]."""
    cfg = model.config
    mla = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, L, cfg.hidden_size, generator=g).requires_grad_(backward)
    positions = torch.arange(L)[None]
    cos, sin = rope_for_config(cfg, positions)

    def run():
        with torch.set_grad_enabled(backward):
            out, _, _ = mla(x, cos, sin, positions, 0, attention=attention)
            if backward:
                out.square().mean().backward()

    return run


def model_fn(model, L: int, attention: str, backward: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, L + 1), generator=g)

    def run():
        with torch.set_grad_enabled(backward):
            logits = model(ids[:, :-1], attention=attention).logits
            if backward:
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

    return run


def timed(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def profile_top(fn, n: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:n]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/models/bench.yaml")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--scopes", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    parser.add_argument("--quick", action="store_true", help="2048 tokens, one rep")
    parser.add_argument("--profile", action="store_true", help="top operators of the layer at the largest length")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.reps = [2048], 1
    cfg = DSAConfig.from_file(args.config).replace(index_topk=args.topk,
                                                   max_position_embeddings=max(args.lengths) + 64)
    model = build_model(cfg, seed=0)
    builders = {"layer": layer_fn, "model": model_fn}
    for scope in args.scopes:
        for L in args.lengths:
            for backward in (False, True):
                medians = {}
                for attention in ("dense", "sparse"):
                    model.zero_grad(set_to_none=True)
                    fn = builders[scope](model, L, attention, backward)
                    # One warm-up run (allocator, first-touch pages) except for whole-model runs past 4k (~1 min each)
                    with dispatch.record() as chosen:
                        times = timed(fn, args.reps, warmup=1 if scope == "layer" or L <= 4096 else 0)
                    medians[attention] = statistics.median(times)
                    line = {"bench": "prefill", "scope": scope, "seq_len": L, "attention": attention,
                            "pass": "fwd+bwd" if backward else "fwd",
                            "index_topk": args.topk if attention == "sparse" else None,
                            "s_median": medians[attention], "s_min": min(times), "reps": len(times),
                            "threads": torch.get_num_threads(), "model_params": model.num_params(),
                            "kernels": dict(sorted(set(chosen)))}
                    if attention == "sparse":
                        line["dense_over_sparse"] = medians["dense"] / medians["sparse"]
                    print(json.dumps(line), flush=True)
    if args.profile:
        L = max(args.lengths)
        for attention in ("sparse", "dense"):
            top = profile_top(layer_fn(model, L, attention, backward=True))
            print(json.dumps({"bench": "prefill_profile", "scope": "layer", "seq_len": L, "attention": attention,
                              "pass": "fwd+bwd", "top_ops": top}), flush=True)


if __name__ == "__main__":
    main()
