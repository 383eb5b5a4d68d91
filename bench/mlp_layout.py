"""The SwiGLU MLP's inference layout on the CPU: row-major (x @ W^T) against feature-major (W @ x^T).

    python bench/mlp_layout.py [--rows 8 32 48 64 128 160 256 512] [--threads 2] [--generates 24] [--quick]

models/layers.py runs inference batches of FEATURE_MAJOR_ROWS rows feature-major. This measures why and
where: one JSON line per (dtype, rows) with the bench model's MLP (256 -> 896 -> 256) timed both ways
(min over 3 rounds of interleaved loops) and their ratio, then one line for the 16-token rollout of
bench/grpo_step.py (8 prompts x 8 samples x 16 new tokens, fp32, dense) with generate() alternating
between the two layouts in one process (median over the calls after the first two of each).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dsarl.actors.engine.native import NativeEngine
from dsarl.actors.engine.types import SamplingParams
from dsarl.data.tasks import make_rows
from dsarl.models import DSAConfig, build_model, load_tokenizer
from dsarl.models import layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import MODEL  # noqa: E402  the GRPO step bench's model

ALWAYS, NEVER = (1, 10**9), (0, 0)


def per_call(fn, calls: int) -> float:
    for _ in range(max(1, calls // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def mlp_rows(dtype: torch.dtype, rows: int, rounds: int = 3) -> dict:
    mlp = layers.SwiGLU(MODEL["hidden_size"], MODEL["intermediate_size"]).to(dtype).requires_grad_(False)
    x = torch.randn(rows, 1, MODEL["hidden_size"]).to(dtype)
    calls = max(20, 20000 // rows)
    times = {"row_major": [], "feature_major": []}
    for _ in range(rounds):
        for name, window in (("row_major", NEVER), ("feature_major", ALWAYS)):
            layers.FEATURE_MAJOR_ROWS = window
            times[name].append(per_call(lambda: mlp(x), calls))
    best = {k: min(v) for k, v in times.items()}
    return {"case": "mlp", "dtype": str(dtype).removeprefix("torch."), "rows": rows,
            "row_major_us": round(best["row_major"] * 1e6, 1), "feature_major_us": round(best["feature_major"] * 1e6, 1),
            "ratio": round(best["feature_major"] / best["row_major"], 3)}


def rollout(generates: int) -> dict:
    model = build_model(DSAConfig(**MODEL, attention="dense"), seed=0).requires_grad_(False)
    tok = load_tokenizer(None)
    engine = NativeEngine(model, tok, max_batch_size=64)
    rows = make_rows("arithmetic", 16 * generates, seed=0)  # grpo_step.py's task at 16 tokens
    times = {"row_major": [], "feature_major": []}
    for i in range(generates):
        order = (("row_major", NEVER), ("feature_major", ALWAYS))
        for j, (name, window) in enumerate(order if i % 2 else order[::-1]):
            layers.FEATURE_MAJOR_ROWS = window
            batch = rows[(2 * i + j) * 8:(2 * i + j + 1) * 8]
            prompts = [tok.encode(r["prompt"], add_bos=True) for r in batch]
            params = SamplingParams(temperature=1.0, max_new_tokens=16, n=8, seed=i)
            t0 = time.perf_counter()
            engine.generate(prompts, params)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    return {"case": "generate_16_tokens", "batch": 64, "generates_each": generates,
            "row_major_s": round(med["row_major"], 4), "feature_major_s": round(med["feature_major"], 4),
            "ratio": round(med["feature_major"] / med["row_major"], 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 32, 48, 64, 128, 160, 256, 512])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--generates", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="rows 64 only, 12 generates each")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.generates = [64], 12
    torch.set_num_threads(args.threads)
    shipped = layers.FEATURE_MAJOR_ROWS
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for rows in args.rows:
                print(json.dumps({**mlp_rows(dtype, rows), "threads": args.threads,
                                  "in_window": shipped[0] <= rows <= shipped[1]}), flush=True)
        print(json.dumps({**rollout(args.generates), "threads": args.threads}), flush=True)
    finally:
        layers.FEATURE_MAJOR_ROWS = shipped


if __name__ == "__main__":
    main()
