"""What `deterministic: true` costs, and whether it changes anything: one `dsarl distill` pipeline run
per mode (and a repeat of each), timed, with the student's weight hash.

    python bench/distill_determinism.py [--config configs/distill.yaml] [--repeats 2] [k=v ...]

Without --config the run is tiny (a 2-layer model, a few steps of every stage; seconds to minutes on
2 cores); dotlist overrides apply to either. One JSON line: wall seconds per mode and repeat, and
whether the repeats of each mode gave bit-identical students and base/specialist weights.
"""
import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from dsarl.launch.config import load_config
from dsarl.launch.distill_pipeline import DistillConfig, run_distill

TINY = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4, "vocab_size": 264}


def tiny_overrides(model_yaml: Path) -> list[str]:
    return [f"pretrain.model.config={model_yaml}", "pretrain.steps=20", "pretrain.batch_size=4", "pretrain.seq_len=64",
            "pretrain.save_every=20", "pretrain.num_threads=1",
            "specialist.data.num_train=32", "specialist.data.num_test=16", "specialist.steps=2",
            "specialist.prompts_per_step=4", "specialist.group_size=2", "specialist.save_every=2",
            "specialist.write_rollouts=false", "specialist.learner_num_cpus=0.25",
            "specialist.rollout.num_cpus_per_worker=0.25", "domains[1].grpo_overrides=[steps=2]",
            "sft.prompts=12", "sft.steps=4", "sft.batch_size=8", "sft.min_samples=1", "sft.reward_threshold=-1.0",
            "opd.steps=4", "opd.prompts_per_step=6", "opd.eval_every=2", "eval_samples=8", "num_validation=8",
            "num_threads=1"]


def hashes(root: Path) -> list[str]:
    files = sorted(root.glob("**/final/model.safetensors"))
    return [hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out: dict = {"bench": "distill_determinism", "config": args.config or "tiny"}
    with tempfile.TemporaryDirectory() as tmp:
        model_yaml = Path(tmp) / "tiny.yaml"
        model_yaml.write_text(OmegaConf.to_yaml(TINY))
        base = [] if args.config else tiny_overrides(model_yaml)
        path = args.config or str(Path(__file__).resolve().parents[1] / "configs" / "distill.yaml")
        for det in (False, True):
            runs = []
            for r in range(args.repeats):
                root = Path(tmp) / f"det{int(det)}-{r}"
                cfg = load_config(DistillConfig, path, base + args.overrides + [f"run_dir={root}",
                                                                                f"deterministic={str(det).lower()}"])
                t = time.perf_counter()
                run_distill(cfg, show_progress=False)
                runs.append((time.perf_counter() - t, hashes(root)))
            key = "deterministic" if det else "default"
            out[f"{key}_s"] = [round(s, 1) for s, _ in runs]
            out[f"{key}_identical"] = all(h == runs[0][1] for _, h in runs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
