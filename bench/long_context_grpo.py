"""DSA's promise end to end: configs/examples/long_context_grpo.yaml (GRPO at ~2000-token passkey prompts,
from the sparse-trained conversion checkpoint) run once with sparse attention and once dense, same seeds
and steps, each as the `dsarl grpo` command a user runs.

    python bench/long_context_grpo.py [--steps 24] [--modes sparse dense]

One JSON line per mode: held-out accuracy before and after (greedy, eval_samples prompts), the run's
wall time and its split summed over the steps (generate, reward, learn, sync, step); then a summary
line: the two accuracy gains, their difference (goal: within 2 points) and the sparse/dense wall ratio
(goal: below 1). Needs runs/conversion/sparse/final (README "DSA conversion", bench/conversion_path.py).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/examples/long_context_grpo.yaml"
SPLIT = ("time/generate", "time/reward", "time/learn", "time/sync", "time/step")


def run_mode(mode: str, steps: int, run_root: Path) -> dict:
    run_dir = run_root / mode
    cmd = [sys.executable, "-m", "dsarl.launch", "grpo", CONFIG, f"model_overrides.attention={mode}",
           f"run_dir={run_dir}", f"steps={steps}", f"save_every={steps}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/accuracy" in r]
    trained = [r for r in rows if "time/step" in r]
    return {"bench": "long_context_grpo", "attention": mode, "steps": len(trained),
            "accuracy_before": evals[0]["eval/accuracy"], "accuracy_after": evals[-1]["eval/accuracy"],
            "gain_points": 100 * (evals[-1]["eval/accuracy"] - evals[0]["eval/accuracy"]),
            "eval_prompts": evals[0]["eval/prompts"],
            "train_accuracy_last4": sum(r["accuracy"] for r in trained[-4:]) / len(trained[-4:]),
            "run_wall_s": wall, **{k.replace("time/", "") + "_s": sum(r[k] for r in trained) for k in SPLIT}}


def gain_difference_se(s: dict, d: dict) -> float:
    """Standard error of (after - before) sparse minus (after - before) dense, each accuracy a binomial
    proportion over eval_prompts prompts: what the 2-point goal must be read against."""
    var = 0.0
    for r in (s, d):
        n = r["eval_prompts"]
        for p in (r["accuracy_before"], r["accuracy_after"]):
            var += p * (1 - p) / n
    return var ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--modes", nargs="+", default=["sparse", "dense"])
    ap.add_argument("--run-root", default="runs/long-context-grpo")
    args = ap.parse_args()
    if not (ROOT / "runs/conversion/sparse/final").exists():
        raise SystemExit("runs/conversion/sparse/final is missing: run bench/conversion_path.py (README 'DSA conversion')")
    out = {}
    for mode in args.modes:
        out[mode] = run_mode(mode, args.steps, ROOT / args.run_root)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out[mode].items()}), flush=True)
    if {"sparse", "dense"} <= out.keys():
        s, d = out["sparse"], out["dense"]
        print(json.dumps({"bench": "long_context_grpo_summary", "gain_sparse_points": round(s["gain_points"], 2),
                          "gain_dense_points": round(d["gain_points"], 2),
                          "gain_difference_points": round(s["gain_points"] - d["gain_points"], 2),
                          # binomial standard error of that difference (four independent accuracies)
                          "gain_difference_se_points": round(100 * gain_difference_se(s, d), 2),
                          "step_time_ratio_sparse_over_dense": round(s["step_s"] / d["step_s"], 3),
                          "run_wall_ratio_sparse_over_dense": round(s["run_wall_s"] / d["run_wall_s"], 3)}),
              flush=True)


if __name__ == "__main__":
    main()
