"""A 3-step GRPO run on one GPU without Ray: the native engine samples on CUDA with sparse attention
(recording its top-k selection), a rule reward scores, the GRPO learner updates on CUDA replaying the
sampler's selection, and the engine takes the new weights. Part of scripts/gpu_check.sh, for machines
where Ray cannot be installed; the same pieces Ray's actors run, in one process.

    python scripts/gpu_grpo_smoke.py [--steps 3]

Prints one JSON line per step and exits non-zero if a step's loss is not finite, the weights did not
move, or the engine did not take them.
"""
import argparse
import json
import math
import random
import sys
import tempfile
import time

import torch

from dsarl.actors.engine import SamplingParams
from dsarl.actors.engine.native import NativeEngine
from dsarl.data.step_types import ScoredRound
from dsarl.learner.group_building import build_groups
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig
from dsarl.models import DSAConfig, build_model, from_pretrained, save_pretrained


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cpu: the same run here, to check the script itself")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"gpu_grpo_smoke": "skipped", "why": "no CUDA device"}))
        return 0
    cfg = DSAConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                    index_n_heads=4, index_head_dim=32, index_topk=16, attention="sparse")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(build_model(cfg, seed=0), tmp)
        policy, tok = from_pretrained(tmp, device=dev)
        sampler_model, _ = from_pretrained(tmp, device=dev)
    engine = NativeEngine(sampler_model, tok, max_batch_size=args.prompts * args.group)
    learner = GRPOLearner(policy, None, LearnerConfig(temperature=1.0, attention="sparse"))
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    rng = random.Random(0)
    ok = True
    for step in range(args.steps):
        pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(args.prompts)]
        rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]
        prompts = [tok.encode(r["prompt"], add_bos=True) for r in rows]
        t0 = time.perf_counter()
        comps = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=24, n=args.group, seed=step,
                                                        return_indices=True))
        sync(dev)
        t_gen = time.perf_counter() - t0
        scores = [{"total": float(c.text.strip().startswith(rows[c.prompt_index]["answer"]))
                   + 0.01 * len(c.token_ids)} for c in comps]  # length term: groups are never uniform
        groups, _ = build_groups([ScoredRound(rows, comps, scores)], args.group, args.prompts, std_normalize=False,
                                 filter_uniform=False, record_indices=True)
        t1 = time.perf_counter()
        metrics = learner.update(groups)
        sync(dev)
        t_learn = time.perf_counter() - t1
        engine.load_weights({k: v.detach() for k, v in policy.state_dict().items()}, version=step + 1)
        moved = max((policy.state_dict()[k].float() - before[k].float()).abs().max().item() for k in before)
        synced = all(torch.equal(sampler_model.state_dict()[k], v) for k, v in policy.state_dict().items())
        finite = math.isfinite(metrics["loss"])
        ok &= finite and moved > 0 and synced
        print(json.dumps({"gpu_grpo_smoke": step + 1, "loss": metrics["loss"], "reward_mean": sum(
            s["total"] for s in scores) / len(scores), "indices_replayed": groups[0].indices is not None,
            "max_weight_change": moved, "engine_synced": synced, "generate_s": round(t_gen, 3),
            "learn_s": round(t_learn, 3), "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
