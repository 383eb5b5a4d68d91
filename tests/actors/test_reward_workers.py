import sys
from pathlib import Path

import pytest
import ray

from dsarl.actors.reward_workers import RewardPool, split_by_group
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.types import RewardSample

PLUGINS = str(Path(__file__).resolve().parents[1] / "rewards")  # tests/rewards/reward_plugins.py


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    sys.path.insert(0, PLUGINS)  # the driver validates the config by building it once
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": PLUGINS}})
    yield
    ray.shutdown()
    sys.path.remove(PLUGINS)


def batch(n_groups=3, g=2):
    return [RewardSample("q", rf"\boxed{{{k}}}", 10 + k, {"answer": "1"}, group_id=gid, sample_index=k)
            for gid in range(n_groups) for k in range(g)]


def test_split_keeps_groups_whole():
    samples = batch(n_groups=5, g=3)
    chunks = split_by_group(samples, 2)
    assert sorted(i for c in chunks for i in c) == list(range(15))
    groups_per_chunk = [{samples[i].group_id for i in c} for c in chunks]
    assert groups_per_chunk[0].isdisjoint(groups_per_chunk[1])
    assert sorted(map(len, chunks)) == [6, 9]


def test_pool_returns_every_sample_with_raising_and_hanging_rewards():
    cfg = RewardConfig([C("math_answer"), C("reward_plugins:boom"), C("reward_plugins:hang", weight=5.0)],
                       timeout_s=0.5, num_workers=2)
    pool = RewardPool(cfg)
    samples = batch()
    results, metrics = pool.score(samples)
    assert len(results) == len(samples)
    # input order: sample_index 1 has \boxed{1} == answer 1, sample_index 0 has \boxed{0}
    assert [r["math_answer"] for r in results] == [0.0, 1.0] * 3
    assert all(r["reward_plugins:boom"] == 0.0 and r["reward_plugins:hang"] == 0.0 for r in results)
    assert [r["total"] for r in results] == [0.0, 1.0] * 3
    assert metrics["reward/reward_plugins:boom/errors"] == 6.0
    assert metrics["reward/reward_plugins:hang/timeouts"] == 6.0
    assert metrics["reward/failures"] == 12.0
    assert metrics["reward/math_answer/mean"] == pytest.approx(0.5)
    assert metrics["reward/worker_failures"] == 0.0
    pool.shutdown()


def test_pool_replaces_a_dead_worker_and_finishes_the_batch():
    cfg = RewardConfig([C("math_answer"), C("reward_plugins:exit_process")], timeout_s=2.0, num_workers=1)
    pool = RewardPool(cfg)
    dying = [RewardSample("q", r"\boxed{1}", 5, {"answer": "1", "die": True}, group_id=g) for g in range(3)]
    results, metrics = pool.score(dying)
    assert len(results) == 3 and all(r["total"] == 0.0 and r["math_answer"] == 0.0 for r in results)
    assert metrics["reward/worker_failures"] == 3.0
    results, metrics = pool.score(batch(n_groups=1))  # the replacement worker scores normally
    assert [r["math_answer"] for r in results] == [0.0, 1.0]
    assert metrics["reward/worker_failures"] == 0.0
    pool.shutdown()


def test_bad_config_fails_in_the_driver():
    with pytest.raises(ValueError, match="neither a built-in"):
        RewardPool(RewardConfig([C("not_a_reward")]))
