"""Config files and the CLI around them: YAML that is not a config mapping, `--resume [CHECKPOINT]`,
and `dsarl config STAGE` printing what a stage would run with."""
import pytest
import yaml

from dsarl.launch.cli import main, parse_args
from dsarl.launch.config import load_config
from dsarl.launch.grpo_loop import GRPOConfig
from dsarl.launch.jobs import entrypoint
from dsarl.learner.pretrain import PretrainConfig
from dsarl.models.config import ConfigError


@pytest.mark.parametrize("text, message", [
    ("steps: [1, 2\n", "not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"),
    ("optim:\n  lr: 1\n lr2: 2\n", "not valid YAML: "),
    ("- steps: 3\n- seed: 1\n", "the top level must be a mapping of config keys, got a list"),
    ("pretrain\n", "the top level must be a mapping of config keys, got a str"),
    ("42\n", "the top level must be a mapping of config keys, got a int"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_a_config_error_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, path)
    assert str(e.value).startswith(f"{path}: {message}")
    assert main(["pretrain", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"dsarl: config error: {path}: {message}")


def test_an_empty_config_file_means_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(PretrainConfig, path).steps == PretrainConfig().steps


def test_a_missing_config_file_or_a_directory_is_a_config_error(tmp_path, capsys):
    assert main(["grpo", str(tmp_path / "nope.yaml")]) == 2
    assert main(["grpo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"dsarl: config error: config file not found: {tmp_path / 'nope.yaml'}",
                   f"dsarl: config error: config file not found: {tmp_path}"]


def test_resume_takes_an_optional_checkpoint_and_leaves_overrides_alone():
    args = parse_args(["grpo", "configs/grpo_tiny.yaml", "steps=3"])
    assert args.resume is False
    args = parse_args(["grpo", "configs/grpo_tiny.yaml", "--resume"])
    assert args.resume is True
    args = parse_args(["grpo", "configs/grpo_tiny.yaml", "--resume", "runs/x/checkpoints/step_000010", "steps=3"])
    assert args.resume == "runs/x/checkpoints/step_000010" and args.overrides == ["steps=3"]
    args = parse_args(["grpo", "configs/grpo_tiny.yaml", "--resume", "steps=3", "seed=1"])
    assert args.resume is True and args.overrides == ["steps=3", "seed=1"]
    args = parse_args(["submit", "grpo", "configs/grpo_tiny.yaml", "--resume", "ckpts/step_000003"])
    assert args.resume == "ckpts/step_000003"


def test_a_submitted_job_passes_resume_and_its_checkpoint_on():
    assert entrypoint("python", "grpo", "c.yaml", ["a=1"], False) == "python -m dsarl.launch.cli grpo c.yaml a=1"
    assert entrypoint("python", "grpo", "c.yaml", [], True) == "python -m dsarl.launch.cli grpo c.yaml --resume"
    assert (entrypoint("python", "grpo", "c.yaml", [], "ckpts/run a/step_000003")
            == "python -m dsarl.launch.cli grpo c.yaml --resume 'ckpts/run a/step_000003'")


def test_dsarl_config_prints_the_resolved_config_the_stage_would_load(capsys):
    assert main(["config", "grpo", "configs/grpo_tiny.yaml", "steps=5", "rollout.max_new_tokens=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["steps=5", "rollout.max_new_tokens=4"])
    assert printed["steps"] == 5 and printed["rollout"]["max_new_tokens"] == 4
    assert printed["rewards"]["components"][1] == {"name": "regex_match", "weight": 0.1, "group": False,
                                                  "label": "format", "kwargs": {"pattern": r"-?\d+", "fullmatch": True},
                                                  "style": "auto", "failure_value": None}
    assert printed["init_from"] == expected.init_from and printed["config_path"] == expected.config_path


def test_dsarl_config_without_a_file_prints_the_defaults_and_names_bad_keys(capsys):
    assert main(["config", "pretrain", "steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["optim"]["lr"] == PretrainConfig().optim.lr
    assert main(["config", "grpo", "configs/grpo_tiny.yaml", "rollout.enigne=vllm"]) == 2
    assert "rollout.enigne" in capsys.readouterr().err
