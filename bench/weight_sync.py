"""Seconds per weight sync against model size, for both `sync.method`s: one JSON line per (method, size).

    python bench/weight_sync.py                                    # quick: 1M and 10M parameters
    python bench/weight_sync.py --sizes 1e6,1e7,1e8,1e9 --workers 2  # the full curve (1B: ~4 GB per copy)

The path is the GRPO driver's own (actors/weight_sync.py): a learner actor (LearnerGroup, rank 0) and a
RolloutPool of native engines, both loaded from a saved checkpoint of about the asked size; one sync is
`publish()` then `deliver(wait=True)`, from the driver's call until every worker has loaded the weights.
object_store: rank 0 copies its state dict and `ray.put`s it, every worker reads and copies it in.
broadcast: gloo on CPU, rank 0 streams its weights into `--bucket-mb` buckets, every worker receives and
loads. bytes: one copy of the weights (what each worker gets); gb_s = bytes / seconds / 1e9.
Memory: about (2 + 2 x workers) copies of the model at the largest size.
"""
import argparse
import json
import statistics
import tempfile
import time

import ray
import torch

from dsarl.actors.learner_group import LearnerGroup
from dsarl.actors.rollout_workers import RolloutPool
from dsarl.actors.weight_sync import SYNC_METHODS
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.models import DSAConfig, build_model, save_pretrained
from dsarl.models.model import DSAForCausalLM


def config_of(hidden: int, layers: int) -> DSAConfig:
    """A dense DSA decoder whose parts all scale with the width (64-dim heads, 8/3 x SwiGLU)."""
    return DSAConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=(8 * hidden // 3 + 63) // 64 * 64, q_lora_rank=hidden // 2,
                     kv_lora_rank=hidden // 4, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                     index_n_heads=4, index_head_dim=64, index_topk=64)


def count(cfg: DSAConfig) -> int:
    with torch.device("meta"):  # shapes only: nothing allocated
        return sum(p.numel() for p in DSAForCausalLM(cfg).parameters())


def config_for(params: float) -> DSAConfig:
    """The width (a multiple of 64) whose parameter count is nearest `params`, depth growing with size."""
    layers = 2 if params <= 4e6 else 4 if params <= 4e7 else 8 if params <= 2e8 else 16
    widths = range(64, 8192 + 1, 64)
    return min((config_of(h, layers) for h in widths), key=lambda c: abs(count(c) - params))


def bench_size(target: float, methods: list[str], workers: int, bucket_mb: float, repeats: int) -> list[dict]:
    cfg = config_for(target)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(cfg, seed=0)
        params = model.num_params()
        nbytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k != "lm_head.weight")
        save_pretrained(model, f"{tmp}/ckpt")
        del model
        learner = LearnerGroup(1, f"{tmp}/ckpt", LearnerConfig(), num_cpus=0.5)
        pool = RolloutPool(workers, f"{tmp}/ckpt", num_cpus_per_worker=0.5)
    out = []
    try:
        for method in methods:
            sync = SYNC_METHODS[method](learner, pool, backend="gloo", bucket_bytes=int(bucket_mb * (1 << 20)))
            sync.connect()
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up (connections, allocator)
                t0 = time.perf_counter()
                sync.deliver(sync.publish(), wait=True)
                times.append(time.perf_counter() - t0)
            seconds = statistics.median(times[1:])
            out.append(dict(bench="weight_sync", method=method, params=params, bytes=nbytes, seconds=round(seconds, 4),
                            seconds_min=round(min(times[1:]), 4), gb_s=round(nbytes / seconds / 1e9, 3),
                            workers=workers, bucket_mb=bucket_mb if method == "broadcast" else None,
                            hidden=cfg.hidden_size, layers=cfg.num_hidden_layers))
            print(json.dumps(out[-1]), flush=True)
    finally:
        learner.shutdown()
        pool.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7", help="comma-separated parameter counts (e.g. 1e6,1e8,1e9)")
    ap.add_argument("--methods", default="object_store,broadcast")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in SYNC_METHODS]
    if unknown:
        raise SystemExit(f"--methods: {unknown} not in {sorted(SYNC_METHODS)}")
    ray.init(num_cpus=max(2, args.workers + 1), include_dashboard=False, log_to_driver=False)
    try:
        for size in args.sizes.split(","):
            bench_size(float(size), methods, args.workers, args.bucket_mb, args.repeats)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
