"""A tiny MoE against a dense model with the same active parameters: rollout tokens/s (native engine)
and the learner's step time (one GRPOLearner.update). One JSON line per (case, model).

    python bench/moe.py [--quick] [--device cuda] [--threads 2]

The MoE model has E routed experts of width w, k per token, plus one shared expert, in every layer but
the first; the dense model has a SwiGLU of width (k + 1) * w in every layer, and so does the MoE's first
layer: per token both run the same MLP FLOPs (the router, E * hidden per MoE layer, aside). The MoE is
timed with and without recording its routing (rollout) and with and without replaying it (learner), the
RL setting being record + replay. Random weights, random prompts, fixed lengths (ignore_eos); the
learner trains on the rollout's own completions with alternating +-1 advantages. Times are the minimum
of `--repeats` runs after a warm-up, the cases taking turns; on a shared CPU they are still noisy:
compare within one run only. wall_s is one generate() (rollout) or one update() (learner_step).
"""
import argparse
import json
import time
from functools import partial

import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.data.step_types import GroupSample
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig
from dsarl.models import ByteTokenizer, DSAConfig, build_model

BASE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, index_n_heads=4, index_head_dim=32,
            index_topk=256, max_position_embeddings=4096)
EXPERTS, TOP_K, EXPERT_WIDTH = 16, 2, 128
ACTIVE_WIDTH = (TOP_K + 1) * EXPERT_WIDTH  # k routed + 1 shared expert


def configs() -> dict[str, DSAConfig]:
    moe = DSAConfig(**BASE, intermediate_size=ACTIVE_WIDTH, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
                    n_shared_experts=1, moe_intermediate_size=EXPERT_WIDTH, n_group=4, topk_group=2,
                    first_k_dense_replace=1)
    return {"moe": moe, "dense": DSAConfig(**BASE, intermediate_size=ACTIVE_WIDTH)}


def active_params(model) -> int:
    """Parameters one token runs through: all but the routed experts it is not sent to."""
    cfg = model.config
    total = model.num_params()
    if not cfg.n_routed_experts:
        return total
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up, down
    moe_layers = cfg.layer_mlp_types.count("sparse")
    return total - moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def groups_of(completions, group_size: int, record: bool) -> list[GroupSample]:
    groups = []
    for p in range(0, len(completions), group_size):
        cs = completions[p: p + group_size]
        groups.append(GroupSample(cs[0].prompt_ids, [c.token_ids for c in cs], [c.logprobs for c in cs],
                                  [(-1.0) ** g for g in range(len(cs))],
                                  experts=[c.experts for c in cs] if record else None))
    return groups


def cases(models: dict, prompts, group: int, new_tokens: int) -> list[tuple[dict, object]]:
    """(description, run) per timed case; each run is one generate() or one update(). The learners
    train on their model's own (recorded) completions; every case gets one warm-up run here."""
    out = []
    for name, model in models.items():
        engine = NativeEngine(model, ByteTokenizer(), max_batch_size=len(prompts) * group)
        for record in ([False, True] if name == "moe" else [False]):
            params = SamplingParams(max_new_tokens=new_tokens, n=group, seed=1, ignore_eos=True,
                                    return_experts=record)
            run = partial(engine.generate, prompts, params)
            completions = run()  # warm-up, and the learner's data
            out.append((dict(model=name, case="rollout", record_experts=record,
                             tokens=sum(len(c.token_ids) for c in completions)), run))
        for replay in ([False, True] if name == "moe" else [False]):
            groups = groups_of(completions, group, record=replay)
            learner = GRPOLearner(model, None, LearnerConfig(use_sampler_experts=replay,
                                                             micro_batch_groups=len(groups)))
            run = partial(learner.update, groups)
            run()  # warm-up
            out.append((dict(model=name, case="learner_step", replay_experts=replay,
                             tokens=sum(g.num_tokens for g in groups)), run))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 prompts x 4 samples, 64-token prompts, 16 new tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts_n, group, context, new_tokens = (4, 4, 64, 16) if args.quick else (8, 8, 256, 64)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (prompts_n, context), generator=g).tolist()
    device = torch.device(args.device)
    models = {name: build_model(cfg, device=device, seed=0) for name, cfg in configs().items()}
    todo = cases(models, prompts, group, new_tokens)
    best = [float("inf")] * len(todo)
    for _ in range(args.repeats):  # round-robin: a busy spell on a shared machine hits every case alike
        for i, (_, run) in enumerate(todo):
            best[i] = min(best[i], timed(run))
    for (desc, _), wall in zip(todo, best):
        model = models[desc["model"]]
        rate = {"tok_s": round(desc["tokens"] / wall, 1)} if desc["case"] == "rollout" else {}
        print(json.dumps(dict(bench="moe", **desc, device=str(device), params=model.num_params(),
                              active_params=active_params(model), prompts=prompts_n, group_size=group,
                              context=context, new_tokens=new_tokens, wall_s=round(wall, 3), **rate)), flush=True)


if __name__ == "__main__":
    main()
