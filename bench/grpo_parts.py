"""The GRPO step's two heavy parts in one process, without Ray: the native engine's rollout and the
learner's update, on bench/grpo_step.py's model and prompts. For profiling what bench/grpo_step.py
times through Ray actors (whose processes a profiler on the driver does not see). The process tunes its
malloc as the actors do (dsarl.actors.allocator): untuned, a 16-token update took 4-6k page faults
the actors never take, and 9-15% longer.

    python bench/grpo_parts.py --prompt-len 4000 --attention dense sparse [--profile] [--threads 2]

One JSON line per attention mode: seconds per rollout (8 prompts x 8 samples x 16 new tokens) and per
learner update (median of --steps after a warm-up), and with --profile the top operators of each
part by self CPU time (torch.profiler).
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


def run(init: str, attention: str, prompt_len: int, prompts: int, group: int, new_tokens: int, steps: int,
        profile: bool) -> dict:
    overrides = {"attention": attention}
    policy, tok = from_pretrained(init, **overrides)
    reference, _ = from_pretrained(init, **overrides)
    sampler, _ = from_pretrained(init, **overrides)
    engine = NativeEngine(sampler, tok, max_batch_size=prompts * group)
    learner = GRPOLearner(policy, reference, LearnerConfig(loss=GRPOLossConfig(beta=0.01), micro_batch_groups=prompts,
                                                           attention=attention))
    rows = make_rows("kv_retrieval", prompts * (steps + 1), seed=0, context_len=prompt_len)
    gen_s, learn_s, profiles = [], [], {}
    for step in range(steps + 1):
        batch = rows[step * prompts:(step + 1) * prompts]
        ids = [tok.encode(r["prompt"], add_bos=True) for r in batch]
        sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, n=group, seed=step,
                            return_indices=attention == "sparse")
        prof = torch.profiler.profile() if profile and step == steps else None
        with prof or torch.autograd.profiler.record_function("generate"):
            t0 = time.perf_counter()
            comps = engine.generate(ids, sp)
            t1 = time.perf_counter()
        if prof is not None:
            profiles["generate"] = top_ops(prof)
        rng = random.Random(step)
        scores = [{"total": rng.random()} for _ in comps]  # never uniform: every group carries a gradient
        groups, _ = build_groups([ScoredRound(batch, comps, scores)], group, prompts, std_normalize=False,
                                 filter_uniform=False, record_indices=attention == "sparse")
        prof = torch.profiler.profile() if profile and step == steps else None
        with prof or torch.autograd.profiler.record_function("learn"):
            t2 = time.perf_counter()
            learner.update(groups)
            t3 = time.perf_counter()
        if prof is not None:
            profiles["learn"] = top_ops(prof)
        if step:  # the first is a warm-up
            gen_s.append(t1 - t0)
            learn_s.append(t3 - t2)
    prompt_tokens = statistics.mean(len(i) for i in ids)
    return {"bench": "grpo_parts", "attention": attention, "prompt_len_target": prompt_len,
            "prompt_tokens": prompt_tokens, "prompts": prompts, "group_size": group, "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "generate_s": statistics.median(gen_s),
            "learn_s": statistics.median(learn_s), **({"profile": profiles} if profile else {})}


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory(anywhere=True)  # as the learner and rollout actors do
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(build_model(DSAConfig(**MODEL), seed=0), tmp)
        for attention in args.attention:
            print(json.dumps(run(tmp, attention, args.prompt_len, args.prompts, args.group, args.new_tokens,
                                 args.steps, args.profile)), flush=True)


if __name__ == "__main__":
    main()
