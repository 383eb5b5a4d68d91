"""The GRPO driver with user plug-ins from the working directory: rewards that fail on some samples,
sub-score means over the samples that have them, and the progress line (issue #19, items 7, 14, 16)."""
import json
import textwrap

import pyarrow.parquet as pq
import pytest
import ray

from dsarl.launch.grpo_loop import GRPOConfig, PromptData, RolloutConfig, present_means, run_grpo
from dsarl.launch.ray_setup import RayConfig, init_ray
from dsarl.models import DSAConfig, build_model, save_pretrained
from dsarl.rewards.config import RewardComponentConfig, RewardConfig

USER_REWARDS = textwrap.dedent('''
    def flaky(sample):
        """A dict reward with a sub-score that fails on every group's second sample."""
        if sample.sample_index == 1:
            raise RuntimeError("flaky reward")
        return {"score": 1.0, "chars": float(len(sample.completion))}


    def always_fails(sample):
        raise KeyError("gold_answer")  # a reward reading a column the dataset does not have
''')


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's project folder as the working directory, with Ray started from it (as `dsarl` does)."""
    path = tmp_path_factory.mktemp("project")
    (path / "my_rewards.py").write_text(USER_REWARDS)
    mp = pytest.MonkeyPatch()
    mp.chdir(path)
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4)
    save_pretrained(build_model(cfg, seed=0), path / "init")
    init_ray(RayConfig(num_cpus=2, include_dashboard=False))
    yield path
    ray.shutdown()
    mp.undo()


def small_grpo(path, run_dir, **kw) -> GRPOConfig:
    return GRPOConfig(
        init_from=str(path / "init"), run_dir=str(path / run_dir), steps=1, prompts_per_step=3, group_size=3,
        data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=32, num_test=4),
        rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=4, max_batch_size=16),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer"),
                                         RewardComponentConfig(name="my_rewards:flaky", label="flaky")],
                             num_cpus_per_worker=0.25),
        learner_num_cpus=0.5, eval_samples=4, tensorboard=False, **kw)


def test_present_means_skip_samples_without_the_key():
    scores = [{"a": 1.0, "a/x": 2.0, "total": 1.0}, {"a": 0.0, "total": 0.0}, {"a": 3.0, "a/x": 4.0, "b": None}]
    assert present_means(scores, "r/") == {"r/a": 4.0 / 3, "r/a/x": 3.0}


def test_a_dict_reward_failing_on_later_samples_keeps_the_step_and_means_are_over_scored_samples(workdir):
    run_grpo(small_grpo(workdir, "flaky"), show_progress=False)
    lines = [json.loads(line) for line in (workdir / "flaky" / "metrics.jsonl").read_text().splitlines()]
    rows = pq.read_table(workdir / "flaky" / "rollouts" / "step_000001.parquet").to_pylist()
    scored = [r for r in rows if r["sample_index"] != 1]
    assert all("flaky/chars" not in dict(r["reward_components"]) for r in rows if r["sample_index"] == 1)
    assert lines[1]["reward/flaky/chars"] == pytest.approx(sum(len(r["text"]) for r in scored) / len(scored))
    assert lines[1]["reward/flaky/errors"] == 3.0  # one per group, counted


def test_progress_line_names_the_phase_and_reward_failures(workdir, capfd):
    run_grpo(small_grpo(workdir, "progress"), show_progress=True)
    err = capfd.readouterr().err
    assert "initial eval (4 prompts)" in err
    assert "reward failures 3" in err


def test_a_reward_failing_on_every_sample_stops_the_run_with_its_traceback(workdir, capsys):
    import yaml

    from dsarl.launch.cli import main

    cfg = {"init_from": str(workdir / "init"), "run_dir": str(workdir / "dead"), "steps": 3, "prompts_per_step": 2,
           "group_size": 2, "eval_samples": 2, "tensorboard": False, "learner_num_cpus": 0.5,
           "data": {"task": "arithmetic", "task_kwargs": {"max_digits": 1}, "num_train": 16, "num_test": 4},
           "rollout": {"num_cpus_per_worker": 0.25, "max_new_tokens": 4},
           "rewards": {"num_cpus_per_worker": 0.25, "components": [{"name": "math_answer"},
                                                                 {"name": "my_rewards:always_fails"}]}}
    (workdir / "dead.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["grpo", str(workdir / "dead.yaml")]) == 3
    err = capsys.readouterr().err
    assert "dsarl: run stopped: RewardComponentDead" in err and "my_rewards:always_fails" in err
    assert 'in always_fails' in err and "KeyError: 'gold_answer'" in err  # the user's own traceback
    assert not (workdir / "dead" / "final").exists()
