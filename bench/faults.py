"""Faults injected into a real GRPO run, and what they cost (issue #21): steps lost, numbers changed.

    python bench/faults.py [--steps 20] [--seed 0]

Runs a tiny GRPO run twice on an embedded Ray: once undisturbed, once with a SIGKILL of each actor kind
at a random step (a rollout worker mid-generate, the learner rank mid-update, a reward worker before it
scores) and a reward worker killed a second time. The faulted run recovers by itself (Ray restarts the
rollout worker and the step is generated again with the same seeds; the reward chunk is scored again on
a replacement worker; the learner group restarts from the last checkpoint, `restart_from_checkpoint`).
Prints one JSON line: the faults injected (kind, step), the steps lost or repeated in metrics.jsonl
(goal 0) and the steps whose learning metrics differ from the undisturbed run's (goal 0; timings are
left out: a retried step takes longer).
"""
import argparse
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import ray

from dsarl.launch.grpo_loop import FaultToleranceConfig, GRPOConfig, GRPOTrainer, PromptData, RolloutConfig
from dsarl.launch.ray_setup import RayConfig, init_ray
from dsarl.models import DSAConfig, build_model, save_pretrained
from dsarl.rewards.config import RewardComponentConfig, RewardConfig

COMPARED = ("reward/mean", "accuracy", "response_length/mean", "loss", "entropy", "grad_norm", "weight_version")


def config(init: str, run_dir: Path, steps: int) -> GRPOConfig:
    return GRPOConfig(
        init_from=init, run_dir=str(run_dir), steps=steps, prompts_per_step=4, group_size=4, save_every=1,
        data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=64, num_test=4),
        rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=8, max_batch_size=16),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer")], num_cpus_per_worker=0.25,
                             chunk_retries=2),
        fault_tolerance=FaultToleranceConfig(restart_from_checkpoint=True, max_learner_restarts=2),
        learner_num_cpus=0.5, eval_samples=4, eval_every=0, tensorboard=False)


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def faulted_run(cfg: GRPOConfig, plan: dict[str, list[int]]) -> list[tuple[str, int]]:
    """Runs cfg with the planned kills (kind -> the 0-based steps to hit); returns what was injected."""
    trainer = GRPOTrainer(cfg)
    injected: list[tuple[str, int]] = []
    step_now = [0]

    submit, score = trainer._submit_round, trainer._score
    group_update = type(trainer.learner).update

    def submit_then_kill(step, round_idx):  # a rollout worker killed right after its generate was sent
        pending = submit(step, round_idx)
        if step in plan["rollout"] and ("rollout", step) not in injected:
            injected.append(("rollout", step))
            os.kill(trainer.rollout.pids()[0], signal.SIGKILL)
        return pending

    def kill_then_score(rows, completions):  # a reward worker killed as its chunk is sent
        step = step_now[0]
        hits = plan["reward"].count(step) - injected.count(("reward", step))
        if hits > 0:
            injected.append(("reward", step))
            os.kill(trainer.rewards.pids()[0], signal.SIGKILL)
        return score(rows, completions)

    def kill_then_update(group, groups):  # the learner rank killed in its update
        step = step_now[0]
        if step in plan["learner"] and ("learner", step) not in injected:
            injected.append(("learner", step))
            os.kill(group.pids()[0], signal.SIGKILL)
        return group_update(group, groups)

    step_fn = trainer.step

    def tracked_step(step):
        step_now[0] = step
        return step_fn(step)

    trainer._submit_round, trainer._score, trainer.step = submit_then_kill, kill_then_score, tracked_step
    type(trainer.learner).update = kill_then_update
    try:
        trainer.fit(show_progress=False)
    finally:
        type(trainer.learner).update = group_update
    return injected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="chooses the steps the faults hit")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    late = list(range(1, args.steps))  # step 0 has no checkpoint to restart a learner from
    plan = {"rollout": [rng.choice(late)], "learner": [rng.choice(late)], "reward": sorted(rng.sample(late, 2))}

    init_ray(RayConfig(num_cpus=2, include_dashboard=False))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                          index_n_heads=2, index_head_dim=16, index_topk=4)
        init = str(save_pretrained(build_model(model, seed=0), tmp / "init"))
        t0 = time.perf_counter()
        GRPOTrainer(config(init, tmp / "clean", args.steps)).fit(show_progress=False)
        t_clean = time.perf_counter() - t0
        t0 = time.perf_counter()
        injected = faulted_run(config(init, tmp / "faulted", args.steps), plan)
        t_faulted = time.perf_counter() - t0
        clean, faulted = metrics_of(tmp / "clean"), metrics_of(tmp / "faulted")
    ray.shutdown()

    want = [m["step"] for m in clean]
    got = [m["step"] for m in faulted]
    lost = len(set(want) - set(got))
    repeated = len(got) - len(set(got))
    by_step = {m["step"]: m for m in faulted}
    differing = [m["step"] for m in clean if m["step"] in by_step and any(
        abs(m.get(k, 0.0) - by_step[m["step"]].get(k, 0.0)) > 1e-6 * max(1.0, abs(m.get(k, 0.0))) for k in COMPARED)]
    last = faulted[-1]
    print(json.dumps({
        "bench": "faults", "steps": args.steps, "seed": args.seed,
        "faults": [{"kind": k, "step": s + 1} for k, s in injected],
        "steps_lost": lost, "steps_repeated": repeated, "steps_differing": differing,
        "rollout_restarts": last.get("faults/rollout_restarts"), "learner_restarts": last.get("faults/learner_restarts"),
        "reward_worker_failures": sum(m.get("reward/worker_failures", 0.0) for m in faulted),
        "unscored_samples": sum(m.get("reward/unscored_samples", 0.0) for m in faulted),
        "clean_s": round(t_clean, 1), "faulted_s": round(t_faulted, 1)}))


if __name__ == "__main__":
    main()
