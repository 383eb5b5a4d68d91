"""Actors' threads follow their Ray CPU share (dsarl.actors.threads), on a real local Ray.

The workers inherit OMP_NUM_THREADS=MKL_NUM_THREADS=3 (as from a driver's or node's environment): Ray
then leaves both alone, so every assertion below that expects 1 or 2 fails if the actor keeps what it
inherited.
"""
import os

import pytest
import ray
import torch

from dsarl.actors.reward_workers import RewardPool
from dsarl.actors.rollout_workers import RolloutWorker
from dsarl.actors.threads import follow_cpu_share, threads_for
from dsarl.models import DSAConfig
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.types import RewardSample

INHERITED = "3"
TINY = DSAConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2, index_head_dim=8,
                 index_topk=4, intermediate_size=64, max_position_embeddings=32).to_dict()
PROBE = '''
import os
import torch

def torch_threads(sample):
    return float(torch.get_num_threads())

def omp_threads(sample):
    return float(os.environ["OMP_NUM_THREADS"])

def mkl_threads(sample):
    return float(os.environ["MKL_NUM_THREADS"])
'''


@pytest.fixture(scope="module")
def inherited_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": INHERITED, "MKL_NUM_THREADS": INHERITED}})
    yield
    ray.shutdown()


def limits(actor) -> tuple[int, str, str]:
    """(torch threads, OMP_NUM_THREADS, MKL_NUM_THREADS) inside the actor's process."""
    return ray.get(actor.__ray_call__.remote(
        lambda self: (torch.get_num_threads(), os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"])))


def test_threads_for_rounds_down_to_at_least_one_and_an_explicit_count_wins():
    assert [threads_for(c, 0) for c in (0.0, 0.25, 1.0, 1.9, 2.0, 7.5)] == [1, 1, 1, 1, 2, 7]
    assert threads_for(0.5, 3) == 3 and threads_for(None, 2) == 2
    assert threads_for(None, 0) is None and threads_for(None, None) is None
    with pytest.raises(ValueError, match="num_threads"):
        threads_for(2.0, -1)


def test_outside_an_actor_only_an_explicit_count_changes_anything(monkeypatch):
    before = torch.get_num_threads()
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, "5")
    try:
        assert follow_cpu_share(0) is None
        assert torch.get_num_threads() == before and os.environ["OMP_NUM_THREADS"] == "5"
        target = 1 if before != 1 else 2
        assert follow_cpu_share(target) == target
        assert torch.get_num_threads() == target
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(target)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("num_cpus, num_threads, expected", [(1, None, 1), (2, None, 2), (0.5, None, 1), (1, 2, 2)])
def test_a_rollout_worker_takes_its_cpu_share_unless_told(inherited_ray, num_cpus, num_threads, expected):
    worker = ray.remote(RolloutWorker).options(num_cpus=num_cpus).remote(config=TINY, num_threads=num_threads)
    try:
        assert limits(worker) == (expected, str(expected), str(expected))
    finally:
        ray.kill(worker)


def test_a_placement_group_bundle_is_a_share_too(inherited_ray):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 2}])
    ray.get(pg.ready())
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    worker = ray.remote(RolloutWorker).options(num_cpus=2, scheduling_strategy=strategy).remote(config=TINY)
    try:
        assert limits(worker) == (2, "2", "2")
    finally:
        ray.kill(worker)
        remove_placement_group(pg)


@pytest.mark.parametrize("num_cpus", [1, 2])
def test_a_reward_worker_and_its_reward_process_take_its_cpu_share(inherited_ray, tmp_path, num_cpus):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    components = [C(f"{probe}:{fn}") for fn in ("torch_threads", "omp_threads", "mkl_threads")]
    pool = RewardPool(RewardConfig(components, timeout_s=60.0, num_workers=1, num_cpus_per_worker=num_cpus))
    try:
        results, _ = pool.score([RewardSample("q", "a", 1, {}, group_id=0, sample_index=0)])
        in_child = [results[0][c.key] for c in components]
        assert in_child == [float(num_cpus)] * 3  # the reward process, a child of the worker
        assert limits(pool.workers[0]) == (num_cpus, str(num_cpus), str(num_cpus))
    finally:
        pool.shutdown()
