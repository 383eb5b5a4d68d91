"""Seconds per GRPO step and its split (generate / reward / learn / sync), dense vs sparse.

    python bench/grpo_step.py [--prompt-lens 16 1000 4000] [--steps 3] [--quick] [--max-staleness 0 1]
                              [--learner-ranks 1 2]

A 4-layer, width-256 DSA model (random weights), 8 prompts x 8 samples x 16 new tokens, a reference
model (beta > 0), on an embedded Ray with this machine's CPUs. Prompts are key-value retrieval texts
of about the given length. One JSON line per (prompt length, attention): the median over the steps
after the first (which includes warm-up). `--max-staleness 0 1` also runs asynchronous rollouts (the
rollout workers generate the next step while the learner trains) and reports each role's idle time and
the generate/update overlap. `--learner-ranks 1 2` runs the learner as 1 and as 2 FSDP2 ranks and reports
each rank's memory after the last step: its parameter, gradient and AdamW shards (`learner_state_bytes`,
the sum; 2 ranks hold about half of 1 rank's each) and the process's peak RSS (`learner_max_rss_bytes`).
`--precision fp32 bf16` also runs the production precision: a bf16 sampler (`rollout.dtype: bfloat16`) and
a learner with bf16 matmuls under fp32 master weights (`learner.fsdp.mixed_precision: bf16`), which is
also TRL GRPOConfig's default (`bf16=True`). `bench/trl_grpo_step.py` times TRL's GRPOTrainer on the
16-token case's work (same model, prompts, batch and beta) in both precisions: run the two one after the
other and compare their ratios.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray

from dsarl.launch.grpo_loop import GRPOConfig, GRPOTrainer, PromptData, RolloutConfig
from dsarl.learner.fsdp import FSDPConfig
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.learner.grpo_loss import GRPOLossConfig
from dsarl.models import DSAConfig, build_model, save_pretrained
from dsarl.rewards.config import RewardComponentConfig, RewardConfig

MODEL = dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, index_n_heads=4,
             index_head_dim=32, index_topk=256, max_position_embeddings=8192)


def run_case(init: str, prompt_len: int, attention: str, steps: int, prompts: int, group: int, new_tokens: int,
             staleness: int = 0, learner_ranks: int = 1, precision: str = "fp32", rollout_workers: int = 1) -> dict:
    task_kwargs = {"context_len": prompt_len} if prompt_len > 32 else {}
    # Synchronous steps alternate the roles, so each may use both cores; asynchronous ones run them at the
    # same time, and 2 + 2 threads on 2 cores made a 16-token step 3x slower (1.69 against 0.48 s): there
    # each role gets its share's thread (one).
    threads = 2 if staleness == 0 else 1
    # Several rollout workers split the rollout's threads (and the prompts: the pool gives each a contiguous
    # shard, and the samples are the ones a single engine would draw). Each worker's Python runs in its own
    # process, so the per-op framework cost of a decode step, most of it at 64 rows, runs on both cores.
    rollout_threads = max(1, threads // rollout_workers)
    cfg = GRPOConfig(
        init_from=init, model_overrides={"attention": attention}, steps=steps, prompts_per_step=prompts,
        group_size=group, save_every=10**9, eval_samples=0, write_rollouts=False, tensorboard=False,
        data=PromptData(task="kv_retrieval" if task_kwargs else "arithmetic", task_kwargs=task_kwargs, num_train=64,
                        num_test=0),
        rollout=RolloutConfig(num_workers=rollout_workers, num_cpus_per_worker=0.5 / rollout_workers,
                              num_threads=rollout_threads, max_new_tokens=new_tokens,
                              max_batch_size=prompts * group, max_staleness=staleness,
                              dtype="bfloat16" if precision == "bf16" else "auto"),
        rewards=RewardConfig(components=[RewardComponentConfig(name="exact_match")], num_cpus_per_worker=0.25),
        learner=LearnerConfig(loss=GRPOLossConfig(beta=0.01), micro_batch_groups=prompts,
                              fsdp=FSDPConfig(mixed_precision=precision)),
        learner_ranks=learner_ranks, learner_num_cpus=0.5, learner_num_threads=threads, accuracy_component="exact_match",
        run_dir=tempfile.mkdtemp(prefix="bench-grpo-"))
    trainer = GRPOTrainer(cfg)
    rows = []
    t_run = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        m = trainer.step(step)
        m["time/step"] = time.perf_counter() - t0
        rows.append(m)
    run_s = time.perf_counter() - t_run  # all steps: asynchronous rollouts move work between steps
    memory = trainer.learner.memory()  # per rank, after the last step (gradients still held)
    trainer.shutdown()
    timed = rows[1:] if len(rows) > 1 else rows
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    return {"bench": "grpo_step", "prompt_len_target": prompt_len,
            "attention": attention, "precision": precision, "index_topk": MODEL["index_topk"],
            "prompts": prompts, "group_size": group, "new_tokens": new_tokens, "beta": 0.01,
            "run_s": run_s, "step_s": med("time/step"), "generate_s": med("time/generate"), "reward_s": med("time/reward"),
            "learn_s": med("time/learn"), "sync_s": med("time/sync"), "max_staleness": staleness,
            "response_length_mean": statistics.mean(r["response_length/mean"] for r in rows),
            "staleness_max": max(r["staleness/max"] for r in rows), "rollout_idle_s": med("time/rollout_idle"),
            "learner_idle_s": med("time/learner_idle"), "overlap_s": med("time/overlap"), "steps_timed": len(timed),
            "learner_ranks": learner_ranks, "rollout_workers": rollout_workers,
            "learner_state_bytes": [m["params_bytes"] + m["grads_bytes"] + m["optimizer_bytes"] for m in memory],
            "learner_params_bytes": [m["params_bytes"] for m in memory],
            "learner_grads_bytes": [m["grads_bytes"] for m in memory],
            "learner_optimizer_bytes": [m["optimizer_bytes"] for m in memory],
            "learner_max_rss_bytes": [m["max_rss_bytes"] for m in memory]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[16, 1000, 4000])
    parser.add_argument("--attention", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 prompts x 2 samples x 4 tokens, 2 steps")
    parser.add_argument("--max-staleness", type=int, nargs="+", default=[0], help="rollout.max_staleness values")
    parser.add_argument("--learner-ranks", type=int, nargs="+", default=[1], help="learner_ranks values (FSDP2)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="fp32, or bf16 sampler weights + bf16 learner matmuls")
    parser.add_argument("--rollout-workers", type=int, nargs="+", default=[1],
                        help="rollout.num_workers values (the rollout's threads split between them)")
    args = parser.parse_args()
    prompts, group, new_tokens, steps = (2, 2, 4, 2) if args.quick else (8, 8, 16, args.steps)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init = Path(tempfile.mkdtemp(prefix="bench-grpo-init-")) / "model"
    model = build_model(DSAConfig(**MODEL), seed=0)
    save_pretrained(model, init)
    for prompt_len in args.prompt_lens:
        for attention in args.attention:
            for staleness in args.max_staleness:
                for ranks in args.learner_ranks:
                    for precision in args.precision:
                        for workers in args.rollout_workers:
                            out = run_case(str(init), prompt_len, attention, steps, prompts, group, new_tokens,
                                           staleness, ranks, precision, workers)
                            out["model_params"] = model.num_params()
                            print(json.dumps(out), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
