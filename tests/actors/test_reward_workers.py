import inspect
import time

import pytest
import ray

from dsarl.actors.reward_workers import RewardPool, split_by_group
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.health import RewardComponentDead
from dsarl.rewards.types import RewardSample

pytestmark = pytest.mark.usefixtures("reward_ray")  # tests/actors/conftest.py


@pytest.fixture
def pool(request):
    p = RewardPool(request.param)
    yield p
    p.shutdown()


def kill_and_wait(actor, timeout_s=30.0):
    """ray.kill only sends the kill: a task sent right after can still run. Return once the actor is gone."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"actor still alive {timeout_s} s after ray.kill")


def batch(n_groups=3, g=2, **row):
    return [RewardSample("q", rf"\boxed{{{k}}}", 10 + k, {"answer": "1", **row}, group_id=gid, sample_index=k)
            for gid in range(n_groups) for k in range(g)]


def test_split_keeps_groups_whole():
    samples = batch(n_groups=5, g=3)
    chunks = split_by_group(samples, 2)
    assert sorted(i for c in chunks for i in c) == list(range(15))
    groups_per_chunk = [{samples[i].group_id for i in c} for c in chunks]
    assert groups_per_chunk[0].isdisjoint(groups_per_chunk[1])
    assert sorted(map(len, chunks)) == [6, 9]


@pytest.mark.parametrize("pool", [RewardConfig(
    [C("math_answer"), C("reward_plugins:boom_if", label="boom"),
     C("reward_plugins:spin_in_c", weight=5.0, label="spin")], timeout_s=1.0, num_workers=2)], indirect=True)
def test_pool_returns_every_sample_with_raising_and_stuck_rewards(pool):
    samples = batch()
    flagged = {1: {"boom": True}, 2: {"spin": True}, 4: {"boom": True, "spin": True}}
    samples = [RewardSample(s.prompt, s.completion, s.num_tokens, {**s.row, **flagged.get(i, {})}, s.group_id,
                            s.sample_index) for i, s in enumerate(samples)]
    workers = list(pool.workers)
    results, metrics = pool.score(samples)
    # input order: sample_index 1 has \boxed{1} == answer 1, sample_index 0 has \boxed{0}
    assert [r["math_answer"] for r in results] == [0.0, 1.0] * 3
    assert [r["boom"] for r in results] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert [r["spin"] for r in results] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [r["total"] for r in results] == [0 + 1 + 5, 1 + 0 + 5, 0 + 1 + 0, 1 + 1 + 5, 0 + 0 + 0, 1 + 1 + 5]
    assert metrics["reward/boom/errors"] == 2.0 and metrics["reward/spin/timeouts"] == 2.0
    assert metrics["reward/spin/failed_frac"] == 2 / 6
    assert metrics["reward/failures"] == 4.0
    assert metrics["reward/math_answer/mean"] == pytest.approx(0.5)
    assert metrics["reward/worker_failures"] == 0.0 and metrics["reward/process_restarts"] == 2.0
    assert pool.workers == workers  # the stuck calls were killed in the reward process, not the worker
    results, metrics = pool.score(batch(n_groups=1))
    assert [r["spin"] for r in results] == [1.0, 1.0] and metrics["reward/failures"] == 0.0


@pytest.mark.parametrize("pool", [RewardConfig([C("math_answer"), C("overlong", kwargs={"max_len": 11, "buffer": 1})],
                                               num_workers=1)], indirect=True)
def test_pool_replaces_a_lost_worker_and_scores_its_chunk_again(pool):
    kill_and_wait(pool.workers[0])  # lost at the Ray level (node gone, OOM kill)
    results, metrics = pool.score(batch(n_groups=2))
    # real scores from the replacement, not the failure values (math_answer 0.0, overlong -1.0)
    assert [r["math_answer"] for r in results] == [0.0, 1.0] * 2
    assert [r["overlong"] for r in results] == [0.0, -1.0] * 2  # 10 tokens -> 0, 11 tokens -> -1
    assert metrics["reward/worker_failures"] == 1.0 and metrics["reward/chunk_retries"] == 1.0
    assert metrics["reward/unscored_samples"] == 0.0 and metrics["reward/failures"] == 0.0
    assert metrics["reward/math_answer/errors"] == 0.0  # a lost worker is not the component's failure


@pytest.mark.parametrize("pool", [RewardConfig([C("math_answer")], num_workers=2, num_cpus_per_worker=0.5,
                                               chunk_retries=0)], indirect=True)
def test_without_retries_a_lost_workers_chunk_is_unscored_not_made_up(pool):
    kill_and_wait(pool.workers[1])
    results, metrics = pool.score(batch(n_groups=2))
    assert results[:2] == [{"math_answer": 0.0, "total": 0.0}, {"math_answer": 1.0, "total": 1.0}]
    assert results[2:] == [None, None]  # group 1 was worker 1's chunk
    assert metrics["reward/unscored_samples"] == 2.0 and metrics["reward/worker_failures"] == 1.0
    assert metrics["reward/math_answer/mean"] == 0.5 and metrics["reward/total/mean"] == 0.5
    results, metrics = pool.score(batch(n_groups=2))  # the replacement scores normally
    assert [r["math_answer"] for r in results] == [0.0, 1.0] * 2
    assert metrics["reward/worker_failures"] == 0.0 and metrics["reward/unscored_samples"] == 0.0


@pytest.mark.parametrize("pool", [RewardConfig([C("reward_plugins:boom"), C("math_answer")], num_workers=2)],
                         indirect=True)
def test_a_reward_failing_on_every_sample_stops_the_pool_with_its_traceback(pool):
    from reward_plugins import boom

    line = inspect.getsourcelines(boom)[1] + 1  # the raise is the line after the def
    with pytest.raises(RewardComponentDead) as dead:
        pool.score(batch())
    text = str(dead.value)
    assert "'reward_plugins:boom' failed on 6 of 6 samples" in text
    assert f'reward_plugins.py", line {line}, in boom' in text and "RuntimeError: reward bug" in text
    assert isinstance(dead.value, RuntimeError)


@pytest.mark.parametrize("pool", [RewardConfig([C("reward_plugins:boom_if", label="boom")], num_workers=2)],
                         indirect=True)
def test_a_reward_failing_on_one_sample_in_eight_does_not_stop_the_pool(pool):
    samples = batch(n_groups=4)
    samples[5] = RewardSample("q", "x", 1, {"boom": True}, group_id=2, sample_index=1)
    results, metrics = pool.score(samples)
    assert [r["boom"] for r in results] == [1.0] * 5 + [0.0] + [1.0] * 2
    assert metrics["reward/boom/failed_frac"] == 1 / 8


@pytest.mark.parametrize("pool", [RewardConfig([C("reward_plugins:none_if_skipped", label="n")], num_workers=2)],
                         indirect=True)
def test_samples_may_have_different_keys(pool):
    samples = batch(n_groups=2)
    samples[0] = RewardSample("q", "x", 7, {"skip": True}, group_id=0)
    results, metrics = pool.score(samples)
    assert "n" not in results[0] and [r["n"] for r in results[1:]] == [11.0, 10.0, 11.0]
    assert metrics["reward/n/mean"] == pytest.approx((11 + 10 + 11) / 3)
    assert metrics["reward/n/unscored"] == 1.0 and metrics["reward/total/mean"] == pytest.approx(32 / 4)


def test_bad_config_fails_in_the_driver():
    with pytest.raises(ValueError, match="neither a built-in"):
        RewardPool(RewardConfig([C("not_a_reward")]))
    with pytest.raises(ValueError, match="'reward_plugins:words'.*per_wrd"):
        RewardPool(RewardConfig([C("reward_plugins:words", kwargs={"per_wrd": 1.0})]))


def test_a_reward_that_fails_to_build_fails_the_pool_at_start():
    with pytest.raises(ValueError, match=r"(?s)'reward_plugins:FailsToBuild'.*cannot load judge-7b"):
        RewardPool(RewardConfig([C("reward_plugins:FailsToBuild", kwargs={"model_path": "judge-7b"})]))
