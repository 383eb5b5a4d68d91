"""Reward throughput: samples/s for rule, code-sandbox and rubric rewards with 1 and 2 Ray workers.

    python bench/rewards.py [--n-rule 400] [--n-code 24] [--n-rubric 400]

Prints one JSON line per case. Each case warms its pool up on a small batch first (actor start,
imports, the math-verify/sympy import), then times one `RewardPool.score` call.
"""
from __future__ import annotations

import argparse
import json
import time

import ray

from dsarl.actors.reward_workers import RewardPool
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.types import RewardSample


def rule_samples(n: int) -> list[RewardSample]:
    texts = [r"We add them: \boxed{\frac{1}{2}}", "so the answer is 12 cm.", r"\boxed{x^2+2x}", "I think 7"]
    answers = ["0.5", "12", "x(x+2)", "8"]
    return [RewardSample("q", texts[i % 4], 20, {"answer": answers[i % 4]}, group_id=i // 8, sample_index=i % 8)
            for i in range(n)]


def code_samples(n: int) -> list[RewardSample]:
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    tests = "assert add(1, 2) == 3\nassert add(-4, 4) == 0\n"
    return [RewardSample("q", good if i % 2 else bad, 30, {"tests": tests}, group_id=i // 4) for i in range(n)]


def rubric_samples(n: int) -> list[RewardSample]:
    texts = ["Hello! Thanks for asking, here it is.", "Sorry, I cannot.", "hi there, thank you"]
    return [RewardSample("q", texts[i % 3], 10, {"rubric": "polite_reply"}, group_id=i // 8) for i in range(n)]


CASES = {
    "rule": ([C("math_answer"), C("overlong", 0.5, {"max_len": 100, "buffer": 20})], rule_samples),
    "code_sandbox": ([C("code_tests", kwargs={"time_s": 5.0})], code_samples),
    "rubric": ([C("rubric")], rubric_samples),
}


def run_case(name: str, workers: int, n: int) -> dict:
    components, make = CASES[name]
    pool = RewardPool(RewardConfig(components, timeout_s=10.0, num_workers=workers, num_cpus_per_worker=1.0))
    pool.score(make(16 * workers))  # warm-up: enough groups to reach every worker
    samples = make(n)
    start = time.perf_counter()
    _, metrics = pool.score(samples)
    elapsed = time.perf_counter() - start
    pool.shutdown()
    return {"bench": "rewards", "case": name, "workers": workers, "samples": n,
            "seconds": round(elapsed, 3), "samples_per_s": round(n / elapsed, 1),
            "failures": metrics["reward/failures"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-rule", type=int, default=400)
    p.add_argument("--n-code", type=int, default=24)
    p.add_argument("--n-rubric", type=int, default=400)
    args = p.parse_args()
    sizes = {"rule": args.n_rule, "code_sandbox": args.n_code, "rubric": args.n_rubric}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name in CASES:
            for workers in (1, 2):
                print(json.dumps(run_case(name, workers, sizes[name])), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
