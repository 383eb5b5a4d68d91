import pytest

from dsarl.rewards.combiner import RewardCombiner
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.registry import build_reward_fn
from dsarl.rewards.types import RewardSample


def samples():
    return [RewardSample("q", r"so \boxed{4}", 30, {"answer": "4", "bonus": 0.5}, group_id=0, sample_index=0),
            RewardSample("q", "it is 5", 10, {"answer": "4", "bonus": 1.0}, group_id=0, sample_index=1),
            RewardSample("r", "one two three", 20, {"answer": "3", "bonus": 0.0}, group_id=1, sample_index=0)]


def test_weighted_total_and_every_component_logged():
    cfg = RewardConfig([C("math_answer", 2.0), C("reward_plugins:words", 0.5, {"per_word": 2.0}),
                        C("reward_plugins:from_row", 1.0), C("reward_plugins:group_rank", -1.0, group=True)])
    results = RewardCombiner(cfg).score_batch(samples())
    # math 1/0/1; words 2*2, 2*3, 2*3; from_row bonus; group ranks by tokens: group0 -> [1, 0], group1 -> [0]
    assert results[0] == {"math_answer": 1.0, "reward_plugins:words": 4.0, "reward_plugins:from_row": 0.5,
                          "reward_plugins:from_row/raw_len": 12.0, "reward_plugins:group_rank": 1.0,
                          "total": 2.0 + 2.0 + 0.5 - 1.0}
    assert results[1]["total"] == pytest.approx(0.0 + 3.0 + 1.0 - 0.0)
    assert results[2]["math_answer"] == 0.0  # "three" is a word, not a number
    assert results[2]["total"] == pytest.approx(0.0 + 3.0 + 0.0 - 0.0)


def test_failures_score_zero_and_are_counted():
    cfg = RewardConfig([C("math_answer"), C("reward_plugins:boom"), C("reward_plugins:nan"),
                        C("reward_plugins:hang")], timeout_s=0.5)
    combiner = RewardCombiner(cfg)
    results, metrics = combiner.score(samples())
    assert [r["math_answer"] for r in results] == [1.0, 0.0, 0.0]
    assert all(r["reward_plugins:boom"] == r["reward_plugins:nan"] == r["reward_plugins:hang"] == 0.0 for r in results)
    assert [r["total"] for r in results] == [1.0, 0.0, 0.0]
    assert metrics["reward/reward_plugins:boom/errors"] == 3.0
    assert metrics["reward/reward_plugins:nan/nans"] == 3.0
    assert metrics["reward/reward_plugins:hang/timeouts"] == 3.0
    assert metrics["reward/math_answer/errors"] == 0.0
    assert metrics["reward/failures"] == 9.0
    assert metrics["reward/abandoned_threads"] == 3.0
    assert combiner.failure_counts[("reward_plugins:boom", "error")] == 3


def test_group_reward_failure_zeroes_the_group():
    cfg = RewardConfig([C("reward_plugins:boom", group=True), C("reward_plugins:words")])
    results, metrics = RewardCombiner(cfg).score(samples())
    assert [r["reward_plugins:boom"] for r in results] == [0.0, 0.0, 0.0]
    assert [r["reward_plugins:words"] for r in results] == [2.0, 3.0, 3.0]
    assert metrics["reward/reward_plugins:boom/errors"] == 3.0


def test_label_allows_one_function_twice_and_names_must_be_unique():
    cfg = RewardConfig([C("reward_plugins:Scaled", kwargs={"factor": 1.0}, label="a"),
                        C("reward_plugins:Scaled", kwargs={"factor": 2.0}, label="b")])
    r = RewardCombiner(cfg).score_batch(samples()[:1])[0]
    assert (r["a"], r["b"], r["total"]) == (30.0, 60.0, 90.0)
    with pytest.raises(ValueError, match="unique"):
        RewardCombiner(RewardConfig([C("math_answer"), C("math_answer")]))


@pytest.mark.parametrize("name,match", [("no_such_reward", "neither a built-in"),
                                        ("reward_plugins:missing", "no attribute"),
                                        ("no_such_module_xyz:f", "cannot import")])
def test_bad_names_fail_at_build(name, match):
    with pytest.raises(ValueError, match=match):
        build_reward_fn(name)
