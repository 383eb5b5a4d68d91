"""Reward throughput, and what the hard per-call time limit costs.

    python bench/rewards.py [--cases rule code_sandbox rubric call_limit] [--n-rule 400] [--n-code 24]
                            [--n-rubric 400] [--n-calls 400]

Prints one JSON line per case. The pool cases (rule, code_sandbox, rubric; 1 and 2 Ray workers) warm
their pool up on a small batch first (actor start, imports, the math-verify/sympy import), then time
one `RewardPool.score` call. `call_limit` times calls of a trivial reward (overlong) and of
math_answer four ways, no Ray: plain calls; the old thread-based limit (`call_in_thread`, one
thread per call); the reward process as the combiner uses it (a component's calls sent together,
results streamed back); and the reward process one call per round trip. Also the reward process's
start (a fresh interpreter building the rewards), which each timed-out call pays again.
"""
from __future__ import annotations

import argparse
import json
import time

import ray

from dsarl.actors.reward_workers import RewardPool
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.registry import build_reward_fn
from dsarl.rewards.timeouts import RewardProcess, call_in_thread
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


LIMITED = {"trivial": C("overlong", kwargs={"max_len": 100, "buffer": 20}), "math_answer": C("math_answer")}


def _per_call_us(start: float, n: int) -> float:
    return round((time.perf_counter() - start) / n * 1e6, 1)


def call_limit_cases(n: int, timeout_s: float = 10.0) -> list[dict]:
    samples = rule_samples(n)
    rows = []
    for reward, comp in LIMITED.items():
        fn = build_reward_fn(comp.name, comp.kwargs)
        for s in samples[:8]:  # warm-up: math-verify's first parse imports sympy's LaTeX parser
            fn(s)
        start = time.perf_counter()
        for s in samples:
            fn(s)
        timings = {"direct": _per_call_us(start, n)}
        start = time.perf_counter()
        for s in samples:
            call_in_thread(fn, s, timeout_s)
        timings["thread"] = _per_call_us(start, n)
        start = time.perf_counter()
        process = RewardProcess([comp])
        process.start()
        started = time.perf_counter() - start
        process.run(0, samples[:8], [timeout_s] * 8)  # warm-up, as above
        start = time.perf_counter()
        process.run(0, samples, [timeout_s] * n)
        timings["process_streamed"] = _per_call_us(start, n)
        start = time.perf_counter()
        for s in samples:
            process.run(0, [s], [timeout_s])
        timings["process_one_by_one"] = _per_call_us(start, n)
        process.close()
        rows.append({"bench": "rewards", "case": "call_limit", "reward": reward, "calls": n,
                     **{f"us_per_call_{mode}": t for mode, t in timings.items()},
                     "process_start_s": round(started, 3)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=[*CASES, "call_limit"], choices=[*CASES, "call_limit"])
    p.add_argument("--n-rule", type=int, default=400)
    p.add_argument("--n-code", type=int, default=24)
    p.add_argument("--n-rubric", type=int, default=400)
    p.add_argument("--n-calls", type=int, default=400)
    args = p.parse_args()
    sizes = {"rule": args.n_rule, "code_sandbox": args.n_code, "rubric": args.n_rubric}
    if "call_limit" in args.cases:
        for row in call_limit_cases(args.n_calls):
            print(json.dumps(row), flush=True)
    pool_cases = [name for name in CASES if name in args.cases]
    if not pool_cases:
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name in pool_cases:
            for workers in (1, 2):
                print(json.dumps(run_case(name, workers, sizes[name])), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
