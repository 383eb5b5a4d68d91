from collections import Counter

import pytest

from dsarl.rewards.health import FailureMonitor, RewardComponentDead


def test_default_stops_only_when_every_sample_of_a_batch_failed():
    monitor = FailureMonitor(["a", "b"])
    monitor.update(Counter({("a", "error"): 7, ("b", "none"): 8}), 8, {"a": "tb-a"})  # 7 of 8: alive
    with pytest.raises(RewardComponentDead, match=r"(?s)'a' failed on 8 of 8 samples.*first error:\ntb-a2"):
        monitor.update(Counter({("a", "error"): 5, ("a", "timeout"): 2, ("a", "nan"): 1}), 8, {"a": "tb-a2"})


def test_window_sums_failures_and_samples_over_the_last_batches():
    monitor = FailureMonitor(["a"], max_failure_rate=0.5, window=3)
    with pytest.raises(RewardComponentDead):  # a window of 3 judges the batches it has seen so far
        monitor.update(Counter({("a", "error"): 4}), 4, {"a": "first"})
    monitor = FailureMonitor(["a"], max_failure_rate=0.5, window=3)
    monitor.update(Counter({("a", "error"): 1}), 4, {"a": "first"})  # 1/4
    monitor.update(Counter(), 4, {})  # 1/8
    monitor.update(Counter({("a", "timeout"): 2}), 4, {"a": "second"})  # 3/12
    monitor.update(Counter({("a", "error"): 3}), 4, {"a": "third"})  # window drops the first: 5/12
    with pytest.raises(RewardComponentDead, match=r"(?s)failed on 6 of 12 samples over the last 3 batch.*second"):
        monitor.update(Counter({("a", "error"): 1}), 4, {"a": "fourth"})  # 2 + 3 + 1 = 6/12 = 0.5


def test_no_samples_scored_changes_nothing():
    monitor = FailureMonitor(["a"])
    monitor.update(Counter(), 0, {})
    monitor.update(Counter({("a", "error"): 1}), 2, {"a": "x"})
