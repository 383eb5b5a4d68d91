"""Hard time limits: a call stuck in C code holding the GIL, or one that kills its process, fails
alone; the combiner carries on with the same object (as a Ray worker would)."""
import threading

import pytest

from dsarl.rewards.combiner import RewardCombiner
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.types import RewardSample

HANG_GUARD_S = 120  # generous: only says "it did not hang"; not a speed check


def within_guard(fn, *args):
    """fn(*args) in a thread, failing the test if it has not returned after HANG_GUARD_S."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), f"still running after {HANG_GUARD_S}s: the time limit did not hold"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def combiner(request):
    c = RewardCombiner(request.param)
    yield c
    c.close()


def row(completion, answer="4", **extra):
    return RewardSample("q", completion, 5, {"answer": answer, **extra})


@pytest.mark.parametrize("combiner", [RewardConfig([C("math_answer")], timeout_s=2.0)], indirect=True)
def test_math_answer_stuck_in_sympy_times_out_and_the_combiner_is_reused(combiner):
    # math-verify evaluates the tower 10^10^10^10 in C (its own timeouts are off): a thread cannot stop it
    batch = [row(r"\boxed{4}"), row(r"\boxed{10^{10^{10^{10}}}}"), row(r"\boxed{4}"), row(r"\boxed{5}")]
    scored = within_guard(combiner.score_report, batch)
    assert [r["math_answer"] for r in scored.results] == [1.0, 0.0, 1.0, 0.0]
    assert scored.counts[("math_answer", "timeout")] == 1
    assert "2s limit" in scored.first_errors["math_answer"]
    again = within_guard(combiner.score_batch, [row(r"\boxed{4}"), row(r"\boxed{x^2}", answer=r"x\cdot x")])
    assert [r["math_answer"] for r in again] == [1.0, 1.0]


@pytest.mark.parametrize("combiner", [RewardConfig([C("reward_plugins:spin_in_c", label="spin"),
                                                    C("reward_plugins:words", label="w")], timeout_s=1.0)],
                         indirect=True)
def test_user_reward_spinning_in_c_times_out_and_later_samples_score(combiner):
    batch = [row("a b", spin=True), row("a b c"), row("a", spin=True), row("a b c d")]
    scored = within_guard(combiner.score_report, batch)
    assert [r["spin"] for r in scored.results] == [0.0, 1.0, 0.0, 1.0]
    assert [r["w"] for r in scored.results] == [2.0, 3.0, 1.0, 4.0]  # the next component ran normally
    assert scored.counts[("spin", "timeout")] == 2 and scored.restarts == 2
    assert [r["spin"] for r in within_guard(combiner.score_batch, [row("x")])] == [1.0]


@pytest.mark.parametrize("combiner", [RewardConfig([C("reward_plugins:exit_process", label="exit"),
                                                    C("math_answer")], timeout_s=5.0)], indirect=True)
def test_a_call_that_kills_its_process_fails_alone(combiner):
    batch = [row(r"\boxed{4}"), row(r"\boxed{4}", die=True), row(r"\boxed{4}"), row(r"\boxed{3}", die=True)]
    scored = within_guard(combiner.score_report, batch)
    assert [r["exit"] for r in scored.results] == [0.0] * 4  # 0.0 both as its score and as failure value
    assert scored.counts[("exit", "error")] == 2
    assert "exit code 1" in scored.first_errors["exit"]
    assert [r["math_answer"] for r in scored.results] == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("combiner", [RewardConfig([C("reward_plugins:WaitForAll", kwargs={"n": 3}, label="all"),
                                                    C("reward_plugins:sleeps_forever_if", label="sleep")],
                                                   timeout_s=5.0)], indirect=True)
def test_async_rewards_are_awaited_together_and_time_out_by_wait_for(combiner):
    batch = [RewardSample("q", "x", 1, {"sleep": k == 1}, sample_index=k) for k in range(3)]
    scored = within_guard(combiner.score_report, batch)
    # WaitForAll finishes only when all three calls are in flight at once
    assert [r["all"] for r in scored.results] == [0.0, 1.0, 2.0]
    assert [r["sleep"] for r in scored.results] == [2.0, 0.0, 2.0]
    assert scored.counts[("sleep", "timeout")] == 1
    assert scored.restarts == 0  # a plain await is cancelled in the process; nothing was killed
