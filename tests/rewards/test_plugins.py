"""Rewards as users write them for other trainers and in their own files, through the combiner
(and so built again in its reward process)."""
import sys

import pytest

from dsarl.rewards.combiner import RewardCombiner
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.registry import validate_reward_config
from dsarl.rewards.types import RewardSample


def score(components, samples, **cfg):
    combiner = RewardCombiner(RewardConfig(components, **cfg))
    try:
        return combiner.score_report(samples)
    finally:
        combiner.close()


def S(completion, group=0, index=0, prompt="q", ids=None, **row):
    return RewardSample(prompt, completion, len(completion), row, group_id=group, sample_index=index,
                        completion_ids=ids)


def test_trl_reference_reward_gets_the_dataset_columns_as_lists():
    rows = [S(r"so \boxed{2}", ground_truth="2"), S(r"\boxed{6}", ground_truth="5", group=1),
            S("no box", ground_truth="1", group=1, index=1)]
    out = score([C("trl_style:reward_func", label="acc")], rows).results
    assert [r["acc"] for r in out] == [1.0, 0.0, 0.0]


def test_trl_functions_get_prompts_completions_columns_and_trainer_state():
    rows = [S("a", prompt="p1", level=1, source="x"), S("bb", prompt="p2", level=3, source="y")]
    out = score([C("trl_style:what_it_got", label="got")], rows).results
    assert [r["got"] for r in out] == [1.0 + 1, 1.0 + 3]


def test_trl_functions_are_called_once_per_chunk_or_once_per_group():
    rows = [S("a", group=0), S("b", group=0, index=1), S("c", group=1), S("d", group=2), S("e", group=2, index=1)]
    out = score([C("trl_style:batch_sizes", label="chunk"), C("trl_style:batch_sizes", label="group", group=True)],
                rows).results
    assert [r["chunk"] for r in out] == [5.0] * 5
    assert [r["group"] for r in out] == [2.0, 2.0, 1.0, 2.0, 2.0]


def test_trl_conversational_completions_when_the_prompt_column_is_chat():
    chat = [{"role": "user", "content": "What is 2+2?"}]
    rows = [S("<think>2+2</think><answer>4</answer>", prompt=chat), S("4", prompt=chat, index=1)]
    rows = [RewardSample(s.prompt, s.completion, 1, {"prompt": chat}, sample_index=s.sample_index) for s in rows]
    out = score([C("trl_style:format_reward_func", label="fmt")], rows).results
    assert [r["fmt"] for r in out] == [1.0, 0.0]


def test_trl_none_means_no_score():
    rows = [S("it is 4", task="math"), S("def f(): pass", task="code"), S("it is 5", task="math")]
    batch = score([C("trl_style:math_only_reward", label="m"), C("trl_style:length_reward", 0.0, label="len")], rows)
    assert [r.get("m") for r in batch.results] == [1.0, None, -1.0]
    assert [r["total"] for r in batch.results] == [1.0, 0.0, -1.0]
    assert batch.counts[("m", "none")] == 1 and not batch.first_errors


def test_trl_async_and_token_ids_and_forced_style():
    rows = [S("abc", ids=[5, 6]), S("", ids=[7, 8, 9], index=1)]
    out = score([C("trl_style:async_reward_func", label="async"), C("trl_style:token_count", label="tokens"),
                 C("reward_plugins:trl_without_names", label="forced", style="trl")], rows).results
    assert [r["async"] for r in out] == [1.0, 0.0]
    assert [r["tokens"] for r in out] == [2.0, 3.0]
    assert [r["forced"] for r in out] == [3.0, 0.0]


def verl_row(solution, truth, index, source="openai/gsm8k"):
    return S(solution, index=index, data_source=source, prompt_messages="ignored",
             reward_model={"style": "rule", "ground_truth": truth}, extra_info={"split": "train", "index": index})


def test_verl_compute_score_with_verls_parquet_layout():
    rows = [verl_row("so #### 72", "72", 0), verl_row("#### 71", "72", 1), verl_row("seventy-two", "72", 2),
            S("#### 1,000", answer="1000")]  # no reward_model column: the answer column is the ground truth
    out = score([C("verl_style:compute_score", label="gsm8k")], rows).results
    assert [r["gsm8k"] for r in out] == [1.0, 0.1, 0.0, 1.0]


def test_verl_dict_return_keeps_score_and_numeric_entries():
    rows = [verl_row("answer 72", "72", 4), verl_row("answer 7", "72", 5, source="other")]
    out = score([C("verl_style:score_with_details", label="v")], rows).results
    assert out[0] == {"v": 1.5, "v/acc": 1.0, "v/index": 4.0, "total": 1.5}
    assert out[1] == {"v": 0.0, "v/acc": 0.0, "v/index": 5.0, "total": 0.0}


def test_verl_style_cannot_be_a_group_reward():
    with pytest.raises(ValueError, match="'v'.*group"):
        validate_reward_config(RewardConfig([C("verl_style:compute_score", label="v", group=True)]))


def test_file_path_rewards_relative_and_absolute(tmp_path, monkeypatch):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "brevity.py").write_text(
        "def short(sample, limit=3):\n    return 1.0 if len(sample.completion) <= limit else 0.0\n")
    monkeypatch.chdir(tmp_path)
    rows = [S("ab"), S("abcdef", index=1)]
    out = score([C("plug/brevity.py:short", label="rel"),
                 C(f"{tmp_path}/plug/brevity.py:short", kwargs={"limit": 10}, label="abs")], rows).results
    assert [(r["rel"], r["abs"]) for r in out] == [(1.0, 1.0), (0.0, 1.0)]


def test_module_beside_the_config_imports_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards_a81c.py").write_text("def loud(sample):\n    return float(sample.completion.isupper())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    out = score([C("cwd_rewards_a81c:loud", label="loud")], [S("HEY"), S("hey", index=1)]).results
    assert [r["loud"] for r in out] == [1.0, 0.0]


def test_validation_resolves_without_building_and_the_combiner_reports_build_errors():
    cfg = RewardConfig([C("reward_plugins:FailsToBuild", kwargs={"model_path": "judge-7b"})])
    validate_reward_config(cfg)  # resolves and binds only: the constructor has not run
    with pytest.raises(ValueError, match=r"(?s)'reward_plugins:FailsToBuild'.*failed to build.*cannot load judge-7b"):
        RewardCombiner(cfg)
    with pytest.raises(ValueError, match="'reward_plugins:FailsToBuild'.*model_pth"):
        validate_reward_config(RewardConfig([C("reward_plugins:FailsToBuild", kwargs={"model_pth": "x"})]))


def test_a_missing_dependency_inside_a_user_module_is_named(tmp_path, monkeypatch):
    from dsarl.rewards.imports import import_attr

    (tmp_path / "cwd_broken_b2.py").write_text("import not_installed_pkg_zz\n\ndef f(sample):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(ValueError, match="'cwd_broken_b2:f'.*No module named 'not_installed_pkg_zz'"):
        import_attr("cwd_broken_b2:f")
    with pytest.raises(ValueError, match="no file"):
        import_attr("missing_dir/rewards.py:f")
