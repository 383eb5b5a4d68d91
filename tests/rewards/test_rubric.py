import pytest

from dsarl.rewards.rubric import RubricError, RubricReward, default_rubric_dir, load_rubric, score_rubric
from dsarl.rewards.types import RewardSample


class KeywordJudge:
    """A real (tiny) JudgeEngine: P(yes) = 0.9 if the response mentions 'because', else 0.2."""

    def __init__(self):
        self.calls = []

    def yes_probability(self, prompts):
        self.calls.append(list(prompts))
        return [0.9 if "because" in p.split("[Response]")[1].split("[Criterion]")[0] else 0.2 for p in prompts]


def S(completion, **row):
    return RewardSample(prompt="What is 2+2?", completion=completion, num_tokens=5, row=row)


def test_shipped_rubrics_load():
    ids = sorted(p.stem for p in default_rubric_dir().glob("*.yaml"))
    assert ids == ["concise_math", "polite_reply"]
    for i in ids:
        assert load_rubric(default_rubric_dir() / f"{i}.yaml").id == i


def test_weighted_mean_with_judge():
    judge = KeywordJudge()
    reward = RubricReward(judge=judge)
    out = reward(S(r"It is 4 because 2+2=4, \boxed{4}", rubric="concise_math"))
    # boxed 1 (w2), no_apology 1 (w0.5), explains 1 (w1), judge 0.9 (w1) -> 4.4 / 4.5
    assert out["score"] == pytest.approx(4.4 / 4.5)
    assert out["reasoning_valid"] == pytest.approx(0.9)
    assert len(judge.calls) == 1 and len(judge.calls[0]) == 1 and "valid" in judge.calls[0][0]
    out = reward(S("Sorry, I think 5.", rubric="concise_math"))
    # boxed 0, no_apology 0, explains 0, judge 0.2 -> 0.2 / 4.5
    assert out["score"] == pytest.approx(0.2 / 4.5)


def test_inline_rubric_and_default():
    inline = {"criteria": [{"name": "a", "weight": 3, "check": "contains", "text": "four"},
                           {"name": "b", "weight": 1, "check": "regex", "pattern": r"\d"}]}
    reward = RubricReward(rubric="polite_reply")
    assert reward(S("four", rubric=inline))["score"] == pytest.approx(0.75)
    assert reward(S("Hello, thank you!"))["score"] == pytest.approx(1.0)  # default rubric, no judge needed


def test_judge_criteria_without_engine_raise():
    with pytest.raises(ValueError, match="no judge engine"):
        RubricReward()(S("x", rubric="concise_math"))


def test_judge_from_module_path():
    reward = RubricReward(judge="test_rubric:KeywordJudge")
    assert isinstance(reward.judge, KeywordJudge)


@pytest.mark.parametrize("body,key", [
    ("criteria:\n  - {name: a, weight: 1, check: regex, patern: 'x'}\n", "criteria[0].patern"),
    ("criteria:\n  - {name: a, weight: heavy, check: regex, pattern: 'x'}\n", "criteria[0].weight"),
    ("criteria:\n  - {name: a, weight: 1, check: vibes}\n", "criteria[0].check"),
    ("criteria:\n  - {name: a, check: judge}\n", "criteria[0].question"),
    ("criteria:\n  - {name: a, weight: -1, check: contains, text: x}\n", "criteria[0].weight"),
    ("criteria:\n  - {name: a, check: regex, pattern: 'x'}\n  - {weight: 1, check: regex, pattern: 'y'}\n",
     "criteria[1].name"),
    ("criteria:\n  - {name: a, check: regex, pattern: '('}\n", "criteria[0].pattern"),
    ("criterias: []\n", "criterias"),
    ("criteria: []\n", "criteria"),
    ("criteria: [1\n", "not valid YAML"),
])
def test_bad_schema_names_file_and_key(tmp_path, body, key):
    path = tmp_path / "broken.yaml"
    path.write_text(body)
    with pytest.raises(RubricError) as e:
        load_rubric(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_unknown_rubric_id_names_the_file(tmp_path):
    with pytest.raises(RubricError, match="nope.yaml"):
        RubricReward(rubric_dir=str(tmp_path))(S("x", rubric="nope"))


def test_score_rubric_python_predicate():
    rubric = load_rubric(default_rubric_dir() / "polite_reply.yaml")
    assert score_rubric(rubric, S("hello. sorry, thanks"), None)["no_apology"] == 0.0
