"""The learner's completion pass over a prompt shared by G completions: its KV held once (SharedPrefixKV,
what dsarl runs) against the layout it replaced, the prompt's rows repeated for every completion.

    python bench/shared_prefix.py [--prompt-lens 1000 4000] [--attention dense sparse] [--updates 3] [--rss]

bench/grpo_step.py's model, 8 prompts x 8 completions of 16 tokens, a reference model (beta > 0), one
GRPO update (prompt pass, completion pass, backward, AdamW) per timing; the two layouts alternate in one
process, so the VM's drift hits both. --rss also runs one update of each layout in a fresh process and
reports its peak RSS. One JSON line per (prompt length, attention).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

from grpo_step import MODEL

from dsarl.data.step_types import GroupSample
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig
from dsarl.learner.grpo_loss import GRPOLossConfig
from dsarl.models import DSAConfig, PrefixKV, build_model

SHARED = PrefixKV.shared_by


def repeated(prefix: PrefixKV, group_size: int) -> PrefixKV:
    """The replaced layout: every prompt row copied for each of its G completions (autograd sums them back)."""
    out = PrefixKV(len(prefix.layers))
    out.layers = [tuple(None if t is None else t.repeat_interleave(group_size, 0) for t in layer)
                  for layer in prefix.layers]
    out.lengths = prefix.lengths.repeat_interleave(group_size)
    return out


LAYOUTS = {"shared": SHARED, "repeated": repeated}


def make_learner(attention: str) -> GRPOLearner:
    cfg = DSAConfig(**MODEL, attention=attention)
    return GRPOLearner(build_model(cfg, seed=0), build_model(cfg, seed=0),
                       LearnerConfig(loss=GRPOLossConfig(beta=0.01), micro_batch_groups=8))


def make_groups(rng: random.Random, prompt_len: int, prompts: int = 8, group: int = 8, tokens: int = 16):
    out = []
    for _ in range(prompts):
        prompt = [rng.randrange(3, 264) for _ in range(prompt_len + rng.randint(-prompt_len // 100, prompt_len // 100))]
        comps = [[rng.randrange(3, 264) for _ in range(tokens)] for _ in range(group)]
        out.append(GroupSample(prompt, comps, [[-1.0] * tokens for _ in comps], [rng.gauss(0, 1) for _ in comps]))
    return out


def timed_update(learner: GRPOLearner, layout: str, groups) -> float:
    PrefixKV.shared_by = LAYOUTS[layout]
    try:
        t0 = time.perf_counter()
        learner.update(groups)
        return time.perf_counter() - t0
    finally:
        PrefixKV.shared_by = SHARED


def peak_rss(layout: str, prompt_len: int, attention: str) -> int:
    """Peak RSS (bytes) of a fresh process running one update with `layout` (Linux)."""
    here = os.path.dirname(os.path.abspath(__file__))
    # VmHWM, not getrusage: Linux carries ru_maxrss across fork and exec, so a child started by a process
    # that already peaked higher reports the parent's peak
    code = (f"import sys; sys.path.insert(0, {here!r}); import random, torch, shared_prefix as b; "
            f"torch.set_num_threads(2); L = b.make_learner({attention!r}); "
            f"b.timed_update(L, {layout!r}, b.make_groups(random.Random(0), {prompt_len})); "
            f"print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024  # kB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--attention", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--updates", type=int, default=3, help="timed updates per layout (after one warm-up each)")
    parser.add_argument("--rss", action="store_true", help="peak RSS of one update per layout, each in a fresh process")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(0)
    for prompt_len in args.prompt_lens:
        for attention in args.attention:
            learner = make_learner(attention)
            times = {name: [] for name in LAYOUTS}
            for i in range(args.updates + 1):
                for name in LAYOUTS:
                    t = timed_update(learner, name, make_groups(rng, prompt_len))
                    if i > 0:
                        times[name].append(t)
            med = {name: statistics.median(v) for name, v in times.items()}
            out = {"bench": "shared_prefix", "prompt_len": prompt_len, "attention": attention, "prompts": 8,
                   "group_size": 8, "completion_tokens": 16, "threads": 2, "updates": args.updates,
                   "update_s_shared": med["shared"], "update_s_repeated": med["repeated"],
                   "ratio_shared_over_repeated": med["shared"] / med["repeated"]}
            if args.rss:
                out.update({f"peak_rss_bytes_{name}": peak_rss(name, prompt_len, attention) for name in LAYOUTS})
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
