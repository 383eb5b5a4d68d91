"""A real GRPO run on a local Ray instance: metrics, Parquet rollouts, checkpoints, exact resume."""
import json
import threading

import pyarrow.parquet as pq
import pytest

from dsarl.launch.grpo_loop import GRPOConfig, PromptData, RolloutConfig, run_grpo
from dsarl.launch.ray_setup import start_together
from dsarl.learner.checkpointing import list_checkpoints
from dsarl.rewards.config import RewardComponentConfig, RewardConfig



def small_grpo(init, run_dir, steps, **kw) -> GRPOConfig:
    return GRPOConfig(
        init_from=init, run_dir=str(run_dir), steps=steps, prompts_per_step=3, group_size=4, save_every=1,
        data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=32, num_test=6),
        rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=4, max_batch_size=16),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer"),
                                         RewardComponentConfig(name="overlong", weight=0.5,
                                                               kwargs={"max_len": 4, "buffer": 2})],
                             num_cpus_per_worker=0.25),
        learner_num_cpus=0.5, eval_samples=6, tensorboard=False, **kw)


def metrics_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


DETERMINISTIC = ("reward/mean", "accuracy", "response_length/mean", "loss", "entropy", "grad_norm", "weight_version")


def test_actor_groups_start_at_once_and_every_one_finishes_before_an_error_is_raised():
    # A barrier for all three makers: it is passed only if they run at the same time (one after another,
    # the first waits alone and the barrier breaks).
    barrier, late_error_raised = threading.Barrier(3, timeout=30), threading.Event()

    def ok(name):
        barrier.wait()
        return name

    def fails(msg, after=None):
        barrier.wait()
        if after is not None:
            after.wait(timeout=30)  # the second maker's error comes first in time
        else:
            late_error_raised.set()
        raise RuntimeError(msg)

    started, error = start_together(learner=lambda: ok("L"), rollout=lambda: ok("R"), rewards=lambda: ok("W"))
    assert started == {"learner": "L", "rollout": "R", "rewards": "W"} and error is None
    started, error = start_together(learner=lambda: fails("first", after=late_error_raised),
                                    rollout=lambda: fails("second"), rewards=lambda: ok("W"))
    assert started == {"rewards": "W"}  # what started is handed back, to be stopped
    assert isinstance(error, RuntimeError) and str(error) == "first"  # the makers' order, not the clock's


def test_two_steps_write_metrics_rollouts_checkpoint_and_resume_exactly(ray_local, init_checkpoint, tmp_path):
    run_grpo(small_grpo(init_checkpoint, tmp_path / "a", steps=3), show_progress=False)
    lines = metrics_lines(tmp_path / "a")
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    for key in ("reward/mean", "reward/math_answer", "reward/overlong", "accuracy", "response_length/mean",
                "entropy", "time/generate", "time/reward", "time/learn", "time/sync", "tokens_per_s"):
        assert key in lines[1], key
    assert lines[3]["weight_version"] == 3 and "eval/accuracy" in lines[0] and "eval/accuracy" in lines[3]
    n_eval = lines[0]["eval/prompts"]  # the 6 test rows less any that are also training prompts (held out)
    assert 1 <= n_eval <= 6 and lines[3]["eval/prompts"] == n_eval
    for m in (lines[0], lines[3]):  # the accuracy's denominator: it is k / n_eval
        assert n_eval * m["eval/accuracy"] == pytest.approx(round(n_eval * m["eval/accuracy"]))
    table = pq.read_table(tmp_path / "a" / "rollouts" / "step_000001.parquet")
    assert table.num_rows == 3 * 4
    rows = table.to_pylist()
    assert all(len(r["completion_token_ids"]) == len(r["logprobs"]) for r in rows)
    assert [c.name for c in list_checkpoints(tmp_path / "a")] == ["step_000002", "step_000003"]

    # interrupted after step 2, resumed: step 3 must repeat the uninterrupted run's numbers
    run_grpo(small_grpo(init_checkpoint, tmp_path / "b", steps=2), show_progress=False)
    run_grpo(small_grpo(init_checkpoint, tmp_path / "b", steps=3), resume=True, show_progress=False)
    resumed = metrics_lines(tmp_path / "b")
    assert [m["step"] for m in resumed] == [0, 1, 2, 3]
    for key in DETERMINISTIC:
        assert resumed[3][key] == pytest.approx(lines[3][key], rel=1e-6, abs=1e-7), key


def test_config_asking_for_100_gpus_fails_fast_naming_the_role(ray_local, init_checkpoint, tmp_path):
    from dsarl.actors.placement import InsufficientResourcesError
    from dsarl.launch.grpo_loop import GRPOTrainer

    cfg = small_grpo(init_checkpoint, tmp_path / "gpu", steps=1)
    cfg.rollout.num_gpus_per_worker = 100.0
    with pytest.raises(InsufficientResourcesError) as e:
        GRPOTrainer(cfg)
    assert "rollout" in str(e.value) and "GPU" in str(e.value)  # raised at start: nothing left pending


def test_resume_from_an_explicit_older_checkpoint_redoes_the_steps_after_it(ray_local, init_checkpoint, tmp_path):
    run_grpo(small_grpo(init_checkpoint, tmp_path / "a", steps=3, keep_checkpoints=3), show_progress=False)
    first = metrics_lines(tmp_path / "a")
    older = list_checkpoints(tmp_path / "a")[0]  # step 1, not the newest
    run_grpo(small_grpo(init_checkpoint, tmp_path / "a", steps=3, keep_checkpoints=3), resume=str(older),
             show_progress=False)
    again = metrics_lines(tmp_path / "a")
    assert [m["step"] for m in again] == [0, 1, 2, 3]  # steps 2 and 3 rewritten, not appended
    for key in DETERMINISTIC:
        assert again[3][key] == pytest.approx(first[3][key], rel=1e-6, abs=1e-7), key
