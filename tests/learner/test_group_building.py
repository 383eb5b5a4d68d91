"""build_groups: DAPO dynamic sampling and group advantages from scored rounds, against hand-made rounds."""
import pytest

from dsarl.data.step_types import Completion, ScoredRound
from dsarl.learner.group_building import build_groups, enough_informative, flatten_rounds


def make_round(rewards: list[list[float]], first_prompt_id: int = 0, version: int = 0) -> ScoredRound:
    """One round whose prompt p has token id first_prompt_id + p and rewards[p][g] as totals."""
    rows, comps, scores = [], [], []
    for p, group in enumerate(rewards):
        rows.append({"prompt": f"q{first_prompt_id + p}"})
        for g, r in enumerate(group):
            comps.append(Completion(prompt_index=p, sample_index=g, prompt_ids=[first_prompt_id + p],
                                    token_ids=[g] * (g + 1), logprobs=[-0.5] * (g + 1), finish_reason="stop",
                                    text="", weight_version=version))
            scores.append({"total": r})
    return ScoredRound(rows, comps, scores)


def test_filter_keeps_the_first_informative_groups_in_round_order_with_their_advantages():
    r0 = make_round([[1, 1], [0, 1], [0, 0]], first_prompt_id=10)
    r1 = make_round([[2, 0], [1, 3]], first_prompt_id=20, version=3)
    assert not enough_informative([r0], 2, target=3)
    assert enough_informative([r0, r1], 2, target=3)
    groups, info = build_groups([r0, r1], group_size=2, target=3, std_normalize=False, filter_uniform=True)
    assert [g.prompt_ids for g in groups] == [[11], [20], [21]]
    assert [g.advantages for g in groups] == [[-0.5, 0.5], [1.0, -1.0], [-1.0, 1.0]]  # r - mean(r)
    assert [g.weight_versions for g in groups] == [[0, 0], [3, 3], [3, 3]]
    assert groups[0].completions == [[0], [1, 1]] and groups[0].sampler_logprobs == [[-0.5], [-0.5, -0.5]]
    assert info == {"groups/kept": 3.0, "groups/uniform": 2.0, "groups/dropped_unscored": 0.0,
                    "reward/mean": pytest.approx(9 / 10)}


def test_without_filter_the_first_round_is_the_batch_and_std_normalisation_divides_by_the_population_std():
    r0 = make_round([[0, 2, 4], [1, 1, 1]])
    groups, info = build_groups([r0], group_size=3, target=2, std_normalize=True, filter_uniform=False)
    std = (8 / 3) ** 0.5  # population std of 0, 2, 4
    assert groups[0].advantages == pytest.approx([-2 / std, 0.0, 2 / std], rel=1e-5)
    assert groups[1].advantages == [0.0, 0.0, 0.0]
    assert info["groups/uniform"] == 1.0


def test_flatten_offsets_later_rounds_without_changing_them():
    r0, r1 = make_round([[0, 1]]), make_round([[1, 0], [0, 0]])
    rows, comps, scores = flatten_rounds([r0, r1])
    assert [c.prompt_index for c in comps] == [0, 0, 1, 1, 2, 2]
    assert [c.prompt_index for c in r1.completions] == [0, 0, 1, 1]  # the round itself is unchanged
    assert len(rows) == 3 and [s["total"] for s in scores] == [0, 1, 1, 0, 0, 0]
