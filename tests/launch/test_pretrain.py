"""`dsarl pretrain` end to end (shortened), resume exactness, and config errors naming key and file."""
import json

import pytest
import torch

from dsarl.launch.cli import main
from dsarl.launch.config import load_config
from dsarl.learner.pretrain import PretrainConfig, pretrain
from dsarl.models import from_pretrained
from dsarl.models.config import ConfigError


def tiny_pretrain_cfg(run_dir, steps: int) -> PretrainConfig:
    cfg = load_config(PretrainConfig, "configs/pretrain_tiny.yaml",
                      [f"run_dir={run_dir}", f"steps={steps}", "log_every=1", "save_every=3", "tensorboard=false",
                       "batch_size=8", "seq_len=64", "optim.warmup_steps=5"])
    return cfg


def test_short_pretrain_beats_unigram_baseline_and_checkpoint_loads(tmp_path):
    cfg = tiny_pretrain_cfg(tmp_path / "run", steps=40)
    final = pretrain(cfg, show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    last = sum(m["loss"] for m in lines[-5:]) / 5
    assert last < lines[0]["unigram_entropy"] - 0.3, (last, lines[0]["unigram_entropy"])
    model, tok = from_pretrained(final)
    assert model.config.hidden_size == 256 and tok.eos_id == 258


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = pretrain(tiny_pretrain_cfg(tmp_path / "a", steps=6), show_progress=False)
    interrupted = tiny_pretrain_cfg(tmp_path / "b", steps=3)  # stops after its step-3 checkpoint
    pretrain(interrupted, show_progress=False)
    resumed = pretrain(tiny_pretrain_cfg(tmp_path / "b", steps=6), resume=True, show_progress=False)
    a, _ = from_pretrained(straight)
    b, _ = from_pretrained(resumed)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_config_typo_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  config: configs/models/tiny.yaml\noptim:\n  lrate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, bad)
    assert "optim.lrate" in str(e.value) and str(bad) in str(e.value)
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, wrong_type)
    assert "steps" in str(e.value) and str(wrong_type) in str(e.value)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    assert main(["pretrain", "configs/pretrain_tiny.yaml", "optim.lrr=3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "command-line" in err


def test_overrides_index_lists_and_may_follow_flags():
    from dsarl.launch.cli import parse_args
    from dsarl.launch.distill_pipeline import DistillConfig

    cfg = load_config(DistillConfig, "configs/distill.yaml", ["domains.1.opd_weight=3.5", "opd.steps=7"])
    assert cfg.domains[1].opd_weight == 3.5 and cfg.opd.steps == 7
    assert cfg.domains[0].opd_weight == load_config(DistillConfig, "configs/distill.yaml").domains[0].opd_weight
    with pytest.raises(ConfigError, match="opd_wieght"):
        load_config(DistillConfig, "configs/distill.yaml", ["domains.1.opd_wieght=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(DistillConfig, "configs/distill.yaml", ["opd.steps"])
    args = parse_args(["distill", "configs/distill.yaml", "a.b=1", "--resume", "c.d=2"])
    assert args.resume and args.config == "configs/distill.yaml" and args.overrides == ["a.b=1", "c.d=2"]
    with pytest.raises(SystemExit):
        parse_args(["distill", "configs/distill.yaml", "--resume", "--bogus"])


TINY_ARGS = ["log_every=1", "save_every=3", "tensorboard=false", "batch_size=8", "seq_len=64", "optim.warmup_steps=5"]


def test_resume_from_an_explicit_checkpoint_continues_from_that_one(tmp_path):
    straight = pretrain(tiny_pretrain_cfg(tmp_path / "a", steps=6), show_progress=False)  # checkpoints at 3 and 6
    ckpt = tmp_path / "a" / "checkpoints" / "step_000003"
    assert main(["pretrain", "configs/pretrain_tiny.yaml", f"run_dir={tmp_path / 'b'}", "steps=6", *TINY_ARGS,
                 "--resume", str(ckpt)]) == 0
    a, _ = from_pretrained(straight)
    b, _ = from_pretrained(tmp_path / "b" / "final")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6]


def test_resume_with_no_checkpoint_in_run_dir_is_a_config_error_naming_it(tmp_path, capsys):
    run_dir = tmp_path / "fresh"
    assert main(["pretrain", "configs/pretrain_tiny.yaml", f"run_dir={run_dir}", "steps=1", *TINY_ARGS,
                 "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"dsarl: config error: --resume: no checkpoint in run_dir {run_dir} (looked for {run_dir / 'checkpoints'}"
        "/step_*); drop --resume to start afresh, or pass --resume CHECKPOINT\n")
    assert not run_dir.exists()
