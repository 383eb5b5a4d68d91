"""The GRPO step's two heavy parts in one process, without Ray: the native engine's rollout and the
learner's update, on bench/grpo_step.py's model and prompts. For profiling what bench/grpo_step.py
times through Ray actors (whose processes a profiler on the driver does not see). The process tunes its
malloc as the actors do (dsarl.actors.allocator): untuned, a 16-token update took 4-6k page faults
the actors never take, and 9-15% longer.

    python bench/grpo_parts.py --prompt-len 4000 --attention dense sparse [--profile] [--threads 2]

One JSON line per attention mode: seconds per rollout (8 prompts x 8 samples x 16 new tokens) and per
learner update (median of --steps after a warm-up), and with --profile the top operators of each
part by self CPU time (torch.profiler). `--gemm-floor` also replays the matrix products one rollout and
one update ran (torch.profiler's record of each mm / addmm / bmm call's shapes), each shape alone in a
loop on fresh contiguous operands: their total is what the part would take if everything around the products cost
nothing and each product ran as fast as it does alone, with its operands in cache. The profiled step is
an extra one, not among the timed steps.
"""
import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grpo_step import MODEL  # noqa: E402  the model bench/grpo_step.py times

from dsarl.actors.allocator import keep_freed_memory  # noqa: E402
from dsarl.actors.engine import SamplingParams  # noqa: E402
from dsarl.actors.engine.native import NativeEngine  # noqa: E402
from dsarl.data.step_types import ScoredRound  # noqa: E402
from dsarl.data.tasks import make_rows  # noqa: E402
from dsarl.learner.group_building import build_groups  # noqa: E402
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig  # noqa: E402
from dsarl.learner.grpo_loss import GRPOLossConfig  # noqa: E402
from dsarl.models import DSAConfig, build_model, from_pretrained, save_pretrained  # noqa: E402


def top_ops(prof, n: int = 12) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count} for e in rows]


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_calls(prof) -> list[tuple[str, tuple, int]]:
    """(op, input shapes, calls) of the matrix products a profile (record_shapes=True) recorded."""
    return [(e.key, tuple(tuple(s) for s in e.input_shapes), e.count)
            for e in prof.key_averages(group_by_input_shape=True) if e.key in GEMM_OPS]


def replay_seconds(calls: list[tuple[str, tuple, int]], dtype=torch.float32, rounds: int = 5) -> float:
    """The seconds the calls take, each shape timed alone (median of `rounds` loops of its count)."""
    total = 0.0
    for op, shapes, count in calls:
        args = [torch.randn(s, dtype=dtype) for s in shapes if len(s)]  # not addmm's beta and alpha ([])
        fn = getattr(torch, op.split("::")[1])
        for _ in range(3):
            fn(*args)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(count):
                fn(*args)
            times.append(time.perf_counter() - t0)
        total += statistics.median(times)
    return total


def gemm_flops(op: str, shapes: tuple) -> int:
    """Multiply-adds x 2 of one call: [.., n, k] @ [.., k, m] (addmm/baddbmm: the product's operands last)."""
    a, b = shapes[-2:] if op in ("aten::mm", "aten::bmm") else shapes[1:3]
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def run(init: str, attention: str, prompt_len: int, prompts: int, group: int, new_tokens: int, steps: int,
        profile: bool, gemm_floor: bool = False) -> dict:
    overrides = {"attention": attention}
    policy, tok = from_pretrained(init, **overrides)
    reference, _ = from_pretrained(init, **overrides)
    sampler, _ = from_pretrained(init, **overrides)
    engine = NativeEngine(sampler, tok, max_batch_size=prompts * group)
    learner = GRPOLearner(policy, reference, LearnerConfig(loss=GRPOLossConfig(beta=0.01), micro_batch_groups=prompts,
                                                           attention=attention))
    extra = profile or gemm_floor  # the profiled step: after the timed ones, and not timed
    rows = make_rows("kv_retrieval", prompts * (steps + 1 + extra), seed=0, context_len=prompt_len)
    gen_s, learn_s, profiles, floors = [], [], {}, {}
    for step in range(steps + 1 + extra):
        batch = rows[step * prompts:(step + 1) * prompts]
        ids = [tok.encode(r["prompt"], add_bos=True) for r in batch]
        sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, n=group, seed=step,
                            return_indices=attention == "sparse")
        profiled = extra and step == steps + 1
        prof = torch.profiler.profile(record_shapes=gemm_floor) if profiled else None
        with prof or torch.autograd.profiler.record_function("generate"):
            t0 = time.perf_counter()
            comps = engine.generate(ids, sp)
            t1 = time.perf_counter()
        if prof is not None:
            profiles["generate"] = top_ops(prof)
            if gemm_floor:
                floors["generate"] = matmul_calls(prof)
        rng = random.Random(step)
        scores = [{"total": rng.random()} for _ in comps]  # never uniform: every group carries a gradient
        groups, _ = build_groups([ScoredRound(batch, comps, scores)], group, prompts, std_normalize=False,
                                 filter_uniform=False, record_indices=attention == "sparse")
        prof = torch.profiler.profile(record_shapes=gemm_floor) if profiled else None
        with prof or torch.autograd.profiler.record_function("learn"):
            t2 = time.perf_counter()
            learner.update(groups)
            t3 = time.perf_counter()
        if prof is not None:
            profiles["learn"] = top_ops(prof)
            if gemm_floor:
                floors["learn"] = matmul_calls(prof)
        if 0 < step <= steps:  # the first is a warm-up
            gen_s.append(t1 - t0)
            learn_s.append(t3 - t2)
    prompt_tokens = statistics.mean(len(i) for i in ids)
    floor = {}
    if gemm_floor:
        for part, calls in floors.items():
            floor[f"{part}_gemm_alone_s"] = replay_seconds(calls)
            floor[f"{part}_gemm_calls"] = sum(c for _, _, c in calls)
            floor[f"{part}_gemm_gflop"] = round(sum(gemm_flops(op, sh) * c for op, sh, c in calls) / 1e9, 2)
        floor["generate_gemm_share"] = floor["generate_gemm_alone_s"] / statistics.median(gen_s)
        floor["learn_gemm_share"] = floor["learn_gemm_alone_s"] / statistics.median(learn_s)
    return {"bench": "grpo_parts", "attention": attention, "prompt_len_target": prompt_len,
            "prompt_tokens": prompt_tokens, "prompts": prompts, "group_size": group, "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "generate_s": statistics.median(gen_s),
            "learn_s": statistics.median(learn_s), **floor, **({"profile": profiles} if profile else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=4000)
    ap.add_argument("--attention", nargs="+", default=["dense", "sparse"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--gemm-floor", action="store_true", help="replay each part's matrix products alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory(anywhere=True)  # as the learner and rollout actors do
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(build_model(DSAConfig(**MODEL), seed=0), tmp)
        for attention in args.attention:
            print(json.dumps(run(tmp, attention, args.prompt_len, args.prompts, args.group, args.new_tokens,
                                 args.steps, args.profile, args.gemm_floor)), flush=True)


if __name__ == "__main__":
    main()
