"""Asynchronous rollouts (rollout.max_staleness): each batch's weight version, the staleness bound, and
generation overlapping the learner's update, on a real local Ray run. No timing asserts: overlap is
read from the workers' own generate intervals against the learner's update window."""
import json

import pyarrow.parquet as pq
import pytest

import dsarl.launch.grpo_loop as grpo_loop
from dsarl.launch.grpo_loop import GRPOConfig, PromptData, RolloutConfig, run_grpo
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.rewards.config import RewardComponentConfig, RewardConfig



def run(init, run_dir, staleness: int, steps: int = 4):
    cfg = GRPOConfig(
        init_from=init, run_dir=str(run_dir), steps=steps, prompts_per_step=4, group_size=4, save_every=100,
        data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=64, num_test=4),
        rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=16, max_batch_size=16, max_staleness=staleness),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer")], num_cpus_per_worker=0.25),
        # several optimizer steps per batch: the learner's update is long enough to overlap
        learner=LearnerConfig(mini_batches=4, micro_batch_groups=1),
        learner_num_cpus=0.5, eval_samples=4, tensorboard=False)
    run_grpo(cfg, show_progress=False)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    versions = [set(pq.read_table(run_dir / "rollouts" / f"step_{s:06d}.parquet")["weight_version"].to_pylist())
                for s in range(1, steps + 1)]
    return metrics, versions


def test_synchronous_loop_samples_with_the_latest_weights_and_never_overlaps(ray_local, init_checkpoint, tmp_path):
    metrics, versions = run(init_checkpoint, tmp_path / "sync", staleness=0)
    assert versions == [{s} for s in range(4)]  # step s samples with the weights of update s
    assert [m["staleness/max"] for m in metrics] == [0.0] * 4
    assert all(m["time/overlap"] == 0.0 for m in metrics)


def test_staleness_one_batches_are_one_version_old_and_generation_overlaps_learning(
        ray_local, init_checkpoint, tmp_path, monkeypatch):
    calls = []
    original = grpo_loop.build_groups
    monkeypatch.setattr(grpo_loop, "build_groups", lambda *a, **k: calls.append(1) or original(*a, **k))
    metrics, versions = run(init_checkpoint, tmp_path / "async", staleness=1)
    # steps 0 and 1 were both submitted before the first update; from then on each step's batch was
    # generated while the previous update trained, with the weights one update older than the learner's
    assert versions == [{0}, {0}, {1}, {2}]
    assert [m["staleness/max"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert [m["weight_version"] for m in metrics] == [1, 2, 3, 4]
    assert sum(m["time/overlap"] for m in metrics) > 0.0
    assert len(calls) == 4  # the driver builds every batch with learner/group_building.build_groups


def test_negative_staleness_is_a_config_error():
    from dsarl.launch.config import load_config
    from dsarl.models.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.max_staleness must be >= 0"):
        load_config(GRPOConfig, None, ["rollout.max_staleness=-1"])
