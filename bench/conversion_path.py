"""The whole DSA conversion path on the tiny model, timed: pretrain (short, then long context, dense)
-> indexer warm-up -> sparse training -> retrieval eval. Prints one JSON line per stage and a summary
line with the issue's numbers (warm-up recall at k = L/16, fp8 overlap, accuracy by mode and length,
and at 2048 on 1000 prompts; training_seconds is the path without the evals).

    python bench/conversion_path.py [--skip pretrain_short pretrain_long ...]

Each stage is the CLI command a user runs, on the configs in configs/conversion/, in a subprocess;
`recall` measures the warmed-up indexer on 16 held-out documents (bench/indexer_recall.py).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    ("pretrain_short", ["pretrain", "configs/conversion/pretrain_short.yaml"]),
    ("pretrain_long", ["pretrain", "configs/conversion/pretrain_long.yaml"]),
    ("warmup", ["warmup", "configs/conversion/warmup.yaml"]),
    ("recall", ["bench/indexer_recall.py", "runs/conversion/warmup/final"]),  # 16 held-out documents
    ("sparse", ["sparse", "configs/conversion/sparse.yaml"]),
    ("eval", ["eval", "configs/conversion/eval.yaml"]),
    ("eval_parity", ["eval", "configs/conversion/eval_parity.yaml"]),  # 1000 prompts at 2048: ~26 min
]
TRAINING = ("pretrain_short", "pretrain_long", "warmup", "sparse")  # the path the 30-minute goal is about


def last_with(path: Path, key: str) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in rows if key in r]
    return rows[-1] if rows else {}


def summary() -> dict:
    runs = ROOT / "runs" / "conversion"
    warm = last_with(runs / "warmup" / "metrics.jsonl", "recall")
    sparse = last_with(runs / "sparse" / "metrics.jsonl", "recall")
    acc = {}
    for name in ("eval", "eval_parity"):
        path = runs / name / "eval.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        acc[name] = {f"{r['label']}/{r['mode']}@{r['context_len']}": r["accuracy"] for r in rows}
    return {"warmup_recall": warm.get("recall"), "warmup_recall_oracle": warm.get("recall_oracle"),
            "warmup_recall_long": warm.get("recall_long"),
            "warmup_fp8_overlap": warm.get("fp8_topk_overlap"), "warmup_kl": warm.get("indexer_kl"),
            "sparse_recall": sparse.get("recall"), "sparse_kl": sparse.get("indexer_kl"), "accuracy": acc}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", nargs="*", default=[], help="stages to skip (their outputs exist)")
    args = ap.parse_args()
    dsarl = [sys.executable, "-m", "dsarl.launch.cli"]
    total = training = 0.0
    recall = {}
    for name, cmd in STAGES:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        if cmd[0].endswith(".py"):  # a bench script: its last line is its JSON result
            lines = subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, capture_output=True,
                                   text=True).stdout.strip().splitlines()
            recall = json.loads(lines[-1])
        else:
            subprocess.run(dsarl + cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        total += dt
        training += dt if name in TRAINING else 0.0
        print(json.dumps({"bench": "conversion_path", "stage": name, "seconds": round(dt, 1)}), flush=True)
    print(json.dumps({"bench": "conversion_path", "total_seconds": round(total, 1),
                      "training_seconds": round(training, 1),
                      "skipped": args.skip, **summary(),
                      "held_out_recall": {k: v for k, v in recall.items() if "recall" in k or "fp8" in k}}))


if __name__ == "__main__":
    main()
