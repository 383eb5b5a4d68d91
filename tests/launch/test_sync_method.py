"""sync.method (issue #22 item 2): the broadcast sync from learner rank 0 (a Ray actor) and the object-store
sync deliver bit-identical weights to every rollout worker; a GRPO run gives the same metrics with either,
synchronous or with asynchronous rollouts, and after a rollout worker is SIGKILLed and restarted; bad values
are config errors naming the key."""
import json
import os
import signal

import pytest
import ray
import torch

from dsarl.actors.learner_group import LearnerGroup
from dsarl.actors.rollout_workers import RolloutPool
from dsarl.actors.weight_sync import BroadcastSync, ObjectStoreSync, SyncRefused
from dsarl.launch.config import load_config
from dsarl.launch.grpo_loop import (FaultToleranceConfig, GRPOConfig, GRPOTrainer, PromptData, RolloutConfig,
                                   SyncConfig)
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.models import DSAConfig, build_model
from dsarl.models.config import ConfigError
from dsarl.rewards.config import RewardComponentConfig, RewardConfig

from learner_faults import learner_killed_in_update

DETERMINISTIC = ("reward/mean", "accuracy", "response_length/mean", "loss", "entropy", "grad_norm", "weight_version",
                 "staleness/max", "eval/accuracy", "eval/reward")


def assert_exact(worker_state: dict, learner_state: dict) -> None:
    assert set(worker_state) == set(learner_state)
    for k, v in learner_state.items():
        assert worker_state[k].dtype == v.dtype and torch.equal(worker_state[k], v), k


@pytest.mark.parametrize("learner_ranks", [1, 2])
def test_broadcast_and_object_store_deliver_bit_identical_weights(ray_local, init_checkpoint, learner_ranks):
    learner = LearnerGroup(learner_ranks, init_checkpoint, LearnerConfig(), num_cpus=0.25)
    pool = RolloutPool(2, init_checkpoint, num_cpus_per_worker=0.25)
    model_cfg = DSAConfig.from_file(f"{init_checkpoint}/config.json")
    try:
        want = learner.state_dict()
        delivered = {}
        for method, sync in [("broadcast", BroadcastSync(learner, pool, bucket_bytes=16 << 10)),
                             ("object_store", ObjectStoreSync(learner, pool))]:
            pool.sync_weights(build_model(model_cfg, seed=7).state_dict(), -1)  # other weights first
            assert not torch.equal(ray.get(pool.workers[1].state_dict.remote())["lm_head.weight"],
                                   want["lm_head.weight"])
            sync.connect()
            version = sync.publish()
            assert sync.deliver(version) == [version, version] == pool.weight_versions()
            delivered[method] = [ray.get(w.state_dict.remote()) for w in pool.workers]
            for got in delivered[method]:  # every worker, every tensor, every bit
                assert_exact(got, want)
        for a, b in zip(delivered["broadcast"], delivered["object_store"]):
            assert_exact(a, b)
    finally:
        learner.shutdown()
        pool.shutdown()


def test_workers_refuse_a_version_the_learner_does_not_hold_and_the_group_survives(ray_local, init_checkpoint):
    learner = LearnerGroup(1, init_checkpoint, LearnerConfig(), num_cpus=0.25)
    pool = RolloutPool(2, init_checkpoint, num_cpus_per_worker=0.25)
    try:
        sync = BroadcastSync(learner, pool)
        sync.connect()
        current = sync.publish()
        with pytest.raises(ray.exceptions.RayTaskError) as e:
            sync.deliver(current + 3)  # the driver's idea of the version is not the learner's
        assert isinstance(e.value.as_instanceof_cause(), SyncRefused)
        assert pool.weight_versions() == [0, 0]  # nothing was loaded
        assert sync.deliver(current) == [current, current]  # the same group, still in step
    finally:
        learner.shutdown()
        pool.shutdown()


def small_grpo(init, run_dir, method: str, staleness: int = 0, steps: int = 3, **kw) -> GRPOConfig:
    return GRPOConfig(
        init_from=init, run_dir=str(run_dir), steps=steps, prompts_per_step=4, group_size=4, save_every=1,
        data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=32, num_test=4),
        rollout=RolloutConfig(num_workers=2, num_cpus_per_worker=0.25, max_new_tokens=8, max_batch_size=16,
                              max_staleness=staleness),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer")], num_cpus_per_worker=0.25),
        learner=LearnerConfig(mini_batches=2, micro_batch_groups=1),
        sync=SyncConfig(method=method, bucket_mb=0.05), learner_num_cpus=0.5, eval_samples=4, tensorboard=False,
        **kw)


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got, want):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        for key in DETERMINISTIC:
            assert (key in g) == (key in w) and g.get(key) == w.get(key), (g["step"], key)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, init_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean")
    GRPOTrainer(small_grpo(init_checkpoint, run_dir, "object_store")).fit(show_progress=False)
    return metrics_of(run_dir)


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_grpo_run_with_broadcast_sync_equals_the_object_store_run(ray_local, init_checkpoint, tmp_path, staleness,
                                                                    uninterrupted):
    runs = {"object_store": uninterrupted} if staleness == 0 else {}  # the same run: staleness 0, object store
    for method in ("object_store", "broadcast"):
        if method not in runs:
            GRPOTrainer(small_grpo(init_checkpoint, tmp_path / method, method, staleness)).fit(show_progress=False)
            runs[method] = metrics_of(tmp_path / method)
    assert runs["broadcast"][-1]["weight_version"] == 3
    assert_same_metrics(runs["broadcast"], runs["object_store"])


def run_killing_a_worker(init, run_dir, method: str, staleness: int = 0, kill_at: int = 1) -> list[dict]:
    """A run whose rollout worker 1 is SIGKILLed right after step kill_at + 1's generate was sent to it."""
    trainer = GRPOTrainer(small_grpo(init, run_dir, method, staleness))
    pid = trainer.rollout.pids()[1]
    submit = trainer._submit_round
    calls = []

    def submit_then_kill(step, round_idx):
        pending = submit(step, round_idx)
        calls.append(step)
        if step == kill_at and calls.count(kill_at) == 1:
            # The generates and the weight sync sent before this round finish first, so the kill lands on this
            # round alone. Killed while an earlier round still generated or a sync still loaded, the earlier
            # round would be redone on newer weights in one run and kept in another (CI saw both).
            trainer.rollout.wait_syncs()  # a worker runs its calls in order: the earlier rounds are done too
            os.kill(pid, signal.SIGKILL)
        return pending

    trainer._submit_round = submit_then_kill
    trainer.fit(show_progress=False)
    got = metrics_of(run_dir)
    assert calls.count(kill_at) == 2 and got[-1]["faults/rollout_restarts"] == 1.0  # those rollouts were redone
    return got


def test_a_killed_rollout_worker_rejoins_the_broadcast_group(ray_local, init_checkpoint, tmp_path, uninterrupted):
    assert_same_metrics(run_killing_a_worker(init_checkpoint, tmp_path, "broadcast"), uninterrupted)


def test_with_async_rollouts_a_killed_worker_recovers_as_with_the_object_store(ray_local, init_checkpoint, tmp_path):
    # step 3's round is sent at the end of step 1, after step 1's sync; the worker dies generating it, and step 2's
    # sync is sent to the dead worker. The redone round samples with the current weights, not the stale ones an
    # uninterrupted run used, so the reference is the same fault under the object store.
    runs = {m: run_killing_a_worker(init_checkpoint, tmp_path / m, m, staleness=1, kill_at=2)
            for m in ("object_store", "broadcast")}
    assert_same_metrics(runs["broadcast"], runs["object_store"])


def test_a_restarted_learner_forms_a_new_broadcast_group(ray_local, init_checkpoint, tmp_path, uninterrupted):
    trainer = GRPOTrainer(small_grpo(init_checkpoint, tmp_path, "broadcast",
                                     fault_tolerance=FaultToleranceConfig(restart_from_checkpoint=True)))
    with learner_killed_in_update(trainer, at_version=2) as killed:  # learner rank 0 dies in step 3's update
        trainer.fit(show_progress=False)
    got = metrics_of(tmp_path)
    assert killed and got[-1]["faults/learner_restarts"] == 1.0
    assert_same_metrics(got, uninterrupted)


def test_a_learner_lost_during_a_broadcast_restarts_from_the_checkpoint(ray_local, init_checkpoint, tmp_path,
                                                                        uninterrupted):
    trainer = GRPOTrainer(small_grpo(init_checkpoint, tmp_path, "broadcast",
                                     fault_tolerance=FaultToleranceConfig(restart_from_checkpoint=True)))
    sync, killed = trainer.sync, []
    deliver = sync.deliver

    def kill_then_deliver(version, wait=True):  # the fault: learner rank 0 dies as step 2's sync starts
        if version == 2 and not killed:
            killed.append(trainer.learner.pids()[0])
            os.kill(killed[0], signal.SIGKILL)
        return deliver(version, wait)

    sync.deliver = kill_then_deliver
    trainer.fit(show_progress=False)
    got = metrics_of(tmp_path)
    assert killed and trainer.sync is not sync and got[-1]["faults/learner_restarts"] == 1.0
    assert_same_metrics(got, uninterrupted)


@pytest.mark.parametrize("override, key", [("sync.method=nccl_p2p", "sync.method"),
                                           ("sync.bucket_mb=0", "sync.bucket_mb"), ("sync.backend=mpi", "sync.backend"),
                                           ("sync.timeout_s=-1", "sync.timeout_s")])
def test_bad_sync_values_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(GRPOConfig, None, [override])


def test_preflight_names_the_key_for_what_broadcast_cannot_do(init_checkpoint, tmp_path):
    from dsarl.launch.preflight import check_sync

    cfg = small_grpo(init_checkpoint, tmp_path, "broadcast")
    cfg.rollout.engine = "vllm"
    with pytest.raises(ConfigError, match=r"sync\.method: broadcast works with rollout\.engine native only"):
        check_sync(cfg)
    cfg.rollout.engine = "native"
    cfg.sync.backend = "nccl"
    with pytest.raises(ConfigError, match=r"sync\.backend: nccl needs a GPU"):
        check_sync(cfg)
    cfg.sync.method = "carrier_pigeon"  # set after construction: preflight still names it
    with pytest.raises(ConfigError, match=r"sync\.method: 'carrier_pigeon' is not one of"):
        check_sync(cfg)
    with pytest.raises(ValueError, match=r"sync\.method must be one of"):
        SyncConfig(method="carrier_pigeon")


def test_a_bf16_sampler_holds_the_learners_weights_rounded_and_samples_close_to_its_fp32_logprobs(
        ray_local, init_checkpoint, tmp_path):
    """rollout.dtype: bfloat16 (the native engine's weights; vLLM's `dtype`), sparse attention: after a step's
    sync every worker holds the fp32 learner's weights cast to bf16 (the indexer's head weights stay fp32, as
    checkpoints keep them), and the sampler's log-probs of its tokens differ from the learner's fp32 ones
    (which replay the sampler's selection) by bf16 rounding: more than an fp32 sampler's, far less than a
    different policy's."""
    diff = {}
    for dtype in ("auto", "bfloat16"):
        cfg = small_grpo(init_checkpoint, tmp_path / dtype, "object_store", steps=1,
                         model_overrides={"attention": "sparse"})  # top-4 of up to ~20 keys: the C kernels in bf16
        cfg.rollout.dtype = dtype
        trainer = GRPOTrainer(cfg)
        try:
            diff[dtype] = trainer.step(0)["logp_sampler_absdiff_mean"]
            want = trainer.learner.state_dict()
            for worker in trainer.rollout.workers:
                got = ray.get(worker.state_dict.remote())
                assert set(got) == set(want)
                for k, v in want.items():
                    keep = dtype == "auto" or k.endswith("indexer.weights_proj.weight")
                    assert torch.equal(got[k], v if keep else v.to(torch.bfloat16)), (dtype, k)
        finally:
            trainer.shutdown()
    assert diff["auto"] < 1e-5 and 1e-4 < diff["bfloat16"] < 0.05, diff
