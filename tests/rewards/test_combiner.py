import pytest

from dsarl.rewards.combiner import RewardCombiner
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.registry import build_reward_fn, validate_reward_config
from dsarl.rewards.types import RewardSample


def samples():
    return [RewardSample("q", r"so \boxed{4}", 30, {"answer": "4", "bonus": 0.5}, group_id=0, sample_index=0),
            RewardSample("q", "it is 5", 10, {"answer": "4", "bonus": 1.0}, group_id=0, sample_index=1),
            RewardSample("r", "one two three", 20, {"answer": "3", "bonus": 0.0}, group_id=1, sample_index=0)]


@pytest.fixture
def combine():
    """combine(cfg) -> a RewardCombiner whose reward process ends with the test."""
    made = []

    def make(cfg):
        made.append(RewardCombiner(cfg))
        return made[-1]
    yield make
    for c in made:
        c.close()


def test_weighted_total_and_every_component_logged(combine):
    cfg = RewardConfig([C("math_answer", 2.0), C("reward_plugins:words", 0.5, {"per_word": 2.0}),
                        C("reward_plugins:from_row", 1.0), C("reward_plugins:group_rank", -1.0, group=True)])
    results = combine(cfg).score_batch(samples())
    # math 1/0/1; words 2*2, 2*3, 2*3; from_row bonus; group ranks by tokens: group0 -> [1, 0], group1 -> [0]
    assert results[0] == {"math_answer": 1.0, "reward_plugins:words": 4.0, "reward_plugins:from_row": 0.5,
                          "reward_plugins:from_row/raw_len": 12.0, "reward_plugins:group_rank": 1.0,
                          "total": 2.0 + 2.0 + 0.5 - 1.0}
    assert results[1]["total"] == pytest.approx(0.0 + 3.0 + 1.0 - 0.0)
    assert results[2]["math_answer"] == 0.0  # "three" is a word, not a number
    assert results[2]["total"] == pytest.approx(0.0 + 3.0 + 0.0 - 0.0)


def test_failures_score_the_failure_value_and_are_counted(combine):
    cfg = RewardConfig([C("math_answer"), C("reward_plugins:boom"), C("reward_plugins:nan", failure_value=-2.0),
                        C("reward_plugins:hang", weight=3.0)], timeout_s=0.5)
    combiner = combine(cfg)
    batch = combiner.score_report(samples())
    results, metrics = batch.results, combiner.metrics(batch)
    assert [r["math_answer"] for r in results] == [1.0, 0.0, 0.0]
    assert all(r["reward_plugins:boom"] == 0.0 and r["reward_plugins:hang"] == 0.0 for r in results)
    assert all(r["reward_plugins:nan"] == -2.0 for r in results)
    assert [r["total"] for r in results] == [1.0 - 2.0, -2.0, -2.0]
    assert metrics["reward/reward_plugins:boom/errors"] == 3.0
    assert metrics["reward/reward_plugins:nan/nans"] == 3.0
    assert metrics["reward/reward_plugins:hang/timeouts"] == 3.0
    assert metrics["reward/reward_plugins:hang/failed_frac"] == 1.0
    assert metrics["reward/math_answer/errors"] == 0.0 and metrics["reward/math_answer/failed_frac"] == 0.0
    assert metrics["reward/failures"] == 9.0
    assert metrics["reward/process_restarts"] == 3.0  # one per hung call
    assert combiner.failure_counts[("reward_plugins:boom", "error")] == 3
    assert 'in boom\n    raise RuntimeError("reward bug")' in batch.first_errors["reward_plugins:boom"]


def test_group_reward_failure_fails_the_group(combine):
    cfg = RewardConfig([C("reward_plugins:boom", group=True), C("reward_plugins:words")])
    combiner = combine(cfg)
    batch = combiner.score_report(samples())
    assert [r["reward_plugins:boom"] for r in batch.results] == [0.0, 0.0, 0.0]
    assert [r["reward_plugins:words"] for r in batch.results] == [2.0, 3.0, 3.0]
    assert combiner.metrics(batch)["reward/reward_plugins:boom/errors"] == 3.0


def test_a_crashing_penalty_scores_its_worst_value_not_zero(combine):
    """The language check raises on a row without a target language: -1 (its worst), not 0 (its best)."""
    cfg = RewardConfig([C("language"), C("overlong", kwargs={"max_len": 10, "buffer": 5})])
    rows = [RewardSample("q", "The answer is four.", 3, {"language": "en"}),
            RewardSample("q", "The answer is four.", 3, {})]
    results = combine(cfg).score_batch(rows)
    assert results[0]["language"] == 0.0 and results[0]["language/share"] == 1.0
    assert results[1]["language"] == -1.0
    assert "language/share" not in results[1]  # a failed call has no sub-scores


def test_failure_value_from_the_reward_and_from_config(combine):
    rows = [RewardSample("q", "a", 1, {}), RewardSample("q", "b", 1, {"boom": True})]
    declared = combine(RewardConfig([C("reward_plugins:DeclaresFailureValue")])).score_batch(rows)
    assert [r["reward_plugins:DeclaresFailureValue"] for r in declared] == [-0.25, -0.5]
    overridden = combine(RewardConfig([C("reward_plugins:DeclaresFailureValue", failure_value=-3.0)])).score_batch(rows)
    assert [r["reward_plugins:DeclaresFailureValue"] for r in overridden] == [-0.25, -3.0]


def test_array_scalars_are_numbers(combine):
    kinds = ["f32", "i64", "bool", "tensor", "tensor1", "dict", "list", "str", "vector"]
    rows = [RewardSample("q", "x", 1, {"kind": k}) for k in kinds]
    combiner = combine(RewardConfig([C("reward_plugins:array_scalars", label="a")]))
    batch = combiner.score_report(rows)
    assert [r["a"] for r in batch.results] == [0.5, 3.0, 1.0, 0.25, 1.5, 0.75, 0.0, 0.0, 0.0]
    assert batch.results[5]["a/n"] == 2.0
    assert combiner.metrics(batch)["reward/a/nans"] == 3.0  # a list, a string and a 2-vector are not numbers


def test_none_is_no_score_not_a_failure(combine):
    rows = [RewardSample("q", "a", 4, {}), RewardSample("q", "b", 6, {"skip": True}), RewardSample("q", "c", 8, {})]
    combiner = combine(RewardConfig([C("reward_plugins:none_if_skipped", 0.5, label="n"),
                                     C("reward_plugins:words", label="w")]))
    batch = combiner.score_report(rows)
    assert batch.results[1] == {"w": 1.0, "total": 1.0}  # no "n": it adds 0 to the total
    assert [r["total"] for r in batch.results] == [0.5 * 4 + 1.0, 1.0, 0.5 * 8 + 1.0]
    metrics = combiner.metrics(batch)
    assert metrics["reward/n/mean"] == (4.0 + 8.0) / 2
    assert metrics["reward/n/unscored"] == 1.0 and metrics["reward/n/failed_frac"] == 0.0
    assert metrics["reward/failures"] == 0.0


def test_label_allows_one_function_twice_and_names_must_be_unique(combine):
    cfg = RewardConfig([C("reward_plugins:Scaled", kwargs={"factor": 1.0}, label="a"),
                        C("reward_plugins:Scaled", kwargs={"factor": 2.0}, label="b")])
    r = combine(cfg).score_batch(samples()[:1])[0]
    assert (r["a"], r["b"], r["total"]) == (30.0, 60.0, 90.0)
    with pytest.raises(ValueError, match="unique"):
        RewardCombiner(RewardConfig([C("math_answer"), C("math_answer")]))


@pytest.mark.parametrize("name,match", [("no_such_reward", "neither a built-in"),
                                        ("reward_plugins:missing", "no attribute"),
                                        ("no_such_module_xyz:f", "cannot import")])
def test_bad_names_fail_at_build(name, match):
    with pytest.raises(ValueError, match=match):
        build_reward_fn(name)


@pytest.mark.parametrize("component,match", [
    (C("reward_plugins:words", kwargs={"per_wrd": 2.0}), r"'reward_plugins:words'.*per_wrd"),
    (C("overlong", kwargs={"max_len": 10}), r"'overlong'.*buffer"),  # a required kwarg is missing
    (C("reward_plugins:Scaled", kwargs={"factr": 2.0}, label="scaled"), r"'scaled'.*factr"),
    (C("math_answer", kwargs={"answer_kye": "a"}), r"'math_answer'.*answer_kye"),
    (C("math_answer", style="TRL"), r"'math_answer'.*style='TRL'"),
    (C("math_answer", failure_value=float("nan")), r"'math_answer'.*failure_value"),
])
def test_config_mistakes_fail_when_the_combiner_is_built(combine, component, match):
    with pytest.raises(ValueError, match=match):
        validate_reward_config(RewardConfig([component]))
    with pytest.raises(ValueError, match=match):
        combine(RewardConfig([component]))
