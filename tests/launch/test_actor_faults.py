"""A rollout worker or a learner rank SIGKILLed mid-run (issue #21 item 3): the run restarts it, redoes
what was lost and finishes with the uninterrupted run's numbers; without the option a lost learner
stops the run saying how to resume."""
import json
import os
import signal

import pytest
import ray

from dsarl.launch.grpo_loop import FaultToleranceConfig, GRPOConfig, GRPOTrainer, PromptData, RolloutConfig
from dsarl.rewards.config import RewardComponentConfig, RewardConfig

from learner_faults import learner_killed_in_update

DETERMINISTIC = ("reward/mean", "accuracy", "response_length/mean", "loss", "entropy", "grad_norm", "weight_version")



def small_grpo(init, run_dir, **ft) -> GRPOConfig:
    return GRPOConfig(
        init_from=init, run_dir=str(run_dir), steps=3, prompts_per_step=4, group_size=4, save_every=1,
        data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=32, num_test=4),
        rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=16, max_batch_size=16),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer")], num_cpus_per_worker=0.25),
        fault_tolerance=FaultToleranceConfig(**ft), learner_num_cpus=0.5, eval_samples=4, tensorboard=False)


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, init_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean")
    GRPOTrainer(small_grpo(init_checkpoint, run_dir)).fit(show_progress=False)
    return metrics_of(run_dir)


def assert_same_run(got, want):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got[1:], want[1:]):
        for key in DETERMINISTIC:
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-7), (g["step"], key)


def test_a_rollout_worker_killed_mid_generate_is_restarted_and_the_step_redone(
        ray_local, init_checkpoint, tmp_path, uninterrupted):
    trainer = GRPOTrainer(small_grpo(init_checkpoint, tmp_path))
    (pid,) = trainer.rollout.pids()
    submit = trainer._submit_round
    calls = []

    def submit_then_kill(step, round_idx):  # the fault: SIGKILL right after step 2's generate was sent
        pending = submit(step, round_idx)
        calls.append(step)
        if step == 1 and calls.count(1) == 1:
            os.kill(pid, signal.SIGKILL)
        return pending

    trainer._submit_round = submit_then_kill
    trainer.fit(show_progress=False)
    got = metrics_of(tmp_path)
    assert calls.count(1) == 2  # step 2's rollouts were generated twice
    assert got[-1]["faults/rollout_restarts"] == 1.0
    assert_same_run(got, uninterrupted)


def test_a_lost_learner_rank_restarts_from_the_last_checkpoint_when_asked(
        ray_local, init_checkpoint, tmp_path, uninterrupted):
    trainer = GRPOTrainer(small_grpo(init_checkpoint, tmp_path, restart_from_checkpoint=True))
    with learner_killed_in_update(trainer, at_version=2) as killed:  # learner rank 0 dies in step 3's update
        trainer.fit(show_progress=False)
    got = metrics_of(tmp_path)
    assert killed and got[-1]["faults/learner_restarts"] == 1.0
    assert_same_run(got, uninterrupted)


def test_a_lost_learner_rank_stops_the_run_naming_resume_by_default(ray_local, init_checkpoint, tmp_path):
    trainer = GRPOTrainer(small_grpo(init_checkpoint, tmp_path))
    os.kill(trainer.learner.pids()[0], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="a learner rank was lost .*--resume"):
        trainer.fit(show_progress=False)


@pytest.mark.parametrize("collective,at_version", [("publish_weights", 1), ("save", 1), ("save_final", 3)])
def test_a_survivors_failed_collective_after_the_update_is_a_lost_rank(
        ray_local, init_checkpoint, tmp_path, collective, at_version):
    """With FSDP every weight gather and checkpoint save is a collective. When a rank's node goes away, Ray
    reports that rank's death only once the node is marked dead (seconds later), so the first error the
    driver meets is rank 0's failed collective: a task error carrying gloo's "connection reset by peer",
    not an actor death (CI met exactly this on a removed node). That is a lost learner rank too: the run
    stops naming --resume, not with the raw gloo error. Injected here: rank 1 SIGKILLed, then the driver
    gets rank 0's own answer first (rank 0's real collective, failing on the real closed socket)."""
    cfg = small_grpo(init_checkpoint, tmp_path)
    cfg.learner_ranks = 2
    cfg.learner_num_cpus = 0.25
    trainer = GRPOTrainer(cfg)
    group_type = type(trainer.learner)
    original = getattr(group_type, collective)
    failures: list[BaseException] = []

    def rank1_lost_rank0_answers_first(group, *args):
        if failures or trainer.learner.weight_version() != at_version:
            return original(group, *args)
        os.kill(group.pids()[1], signal.SIGKILL)
        try:
            answer = ray.get(getattr(group.ranks[0], collective).remote(*args))
        except ray.exceptions.RayError as e:
            failures.append(e)
            raise
        return answer

    setattr(group_type, collective, rank1_lost_rank0_answers_first)
    try:
        with pytest.raises(RuntimeError, match="a learner rank was lost .*--resume"):
            trainer.fit(show_progress=False)
    finally:
        setattr(group_type, collective, original)
    assert len(failures) == 1 and not isinstance(failures[0], ray.exceptions.RayActorError)  # the gloo error
