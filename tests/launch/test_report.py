"""`dsarl report`: plots for whichever metrics exist, overlaid runs, and a summary with exact numbers."""
import json

import pytest

from dsarl.launch.cli import main
from dsarl.launch.config import load_config
from dsarl.learner.pretrain import PretrainConfig, pretrain

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def grpo_rows(rewards, accs, t0):
    """Three GRPO-style steps 10 s apart, the times split 2 + 1 + 4 + 1 s."""
    return [{"step": s, "time": t0 + 10.0 * i, "reward/mean": r, "reward/format": r / 2, "accuracy": a,
             "response_length/mean": 100.0 + 10 * i, "kl": 0.01 * s, "entropy": 1.5 - 0.1 * i,
             "time/generate": 2.0, "time/reward": 1.0, "time/learn": 4.0, "time/sync": 1.0}
            for i, (s, r, a) in enumerate(zip([1, 2, 3], rewards, accs))]


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "a", grpo_rows([0.1, 0.5, 0.4], [0.25, 0.5, 0.5], t0=1000.0))
    b = write_run(tmp_path / "b", grpo_rows([0.2, 0.3, 0.7], [0.0, 0.25, 0.75], t0=5000.0)[:2])  # stopped early
    return a, b


def table_row(text: str, first_cell: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_two_runs_give_plots_and_an_exact_summary(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "out"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert "6 plots" in capsys.readouterr().out
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["accuracy.png", "entropy.png", "kl.png", "length.png", "reward.png", "step_time.png"]
    for p in (out / "plots").iterdir():
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000, p
    md = (out / "report.md").read_text()

    comparison = section(md, "Comparison (final values)")
    assert table_row(comparison, "run") == ["run", "steps", "wall time", "reward/mean", "accuracy",
                                            "response_length/mean", "kl", "entropy"]
    assert table_row(comparison, "a") == ["a", "3", "20.0s", "0.4", "0.5", "120", "0.03", "1.3"]
    assert table_row(comparison, "b") == ["b", "2", "10.0s", "0.3", "0.25", "110", "0.02", "1.4"]

    split = section(md, "Step time split (mean seconds per logged step)")
    assert table_row(split, "a") == ["a", "2 (25%)", "1 (12%)", "4 (50%)", "1 (12%)", "8"]

    run_a = section(md, "a")
    assert "- steps: 3 (3 logged)" in run_a and "- wall time: 20.0s" in run_a
    assert table_row(run_a, "reward/mean") == ["reward/mean", "0.4", "0.1", "0.5", "0.5 (step 2)"]
    assert table_row(run_a, "accuracy") == ["accuracy", "0.5", "0.25", "0.5", "0.5 (step 2)"]  # first best
    assert table_row(run_a, "kl") == ["kl", "0.03", "0.01", "0.03", "-"]  # no "better" direction
    assert "![reward](plots/reward.png)" in md


def test_report_of_a_real_pretrain_run_goes_into_its_run_dir(two_runs, tmp_path, capsys):
    run = tmp_path / "pretrain"
    cfg = load_config(PretrainConfig, "configs/pretrain_tiny.yaml",
                      [f"run_dir={run}", "steps=3", "log_every=1", "save_every=3", "batch_size=4", "seq_len=32",
                       "tensorboard=false"])
    pretrain(cfg, show_progress=False)
    assert main(["report", str(run)]) == 0  # one run: the report goes into it
    md = (run / "report.md").read_text()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert table_row(md, "loss")[1:4] == [f"{losses[-1]:.4g}", f"{min(losses):.4g}", f"{max(losses):.4g}"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png", "optim.png", "other.png"]

    out = tmp_path / "mixed"  # a pretrain run next to a GRPO run: each column where it exists
    assert main(["report", str(run), str(two_runs[0]), "--out", str(out)]) == 0
    comparison = section((out / "report.md").read_text(), "Comparison (final values)")
    assert table_row(comparison, "run")[-1] == "loss"
    row = table_row(comparison, "pretrain")
    assert row[:2] == ["pretrain", "3"] and row[3] == "-" and row[-1] == f"{losses[-1]:.4g}"  # no reward/mean
    assert table_row(comparison, "a")[-1] == "-"  # no loss in the GRPO run


def test_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_time_step_is_the_total_of_the_split_not_one_more_phase(tmp_path, capsys):
    # GRPOTrainer.fit logs time/step (the whole step, eval and logging included) beside its phases
    rows = [{**r, "time/step": 10.0} for r in grpo_rows([0.1, 0.5, 0.4], [0.25, 0.5, 0.5], t0=1000.0)]
    run = write_run(tmp_path / "a", rows)
    assert main(["report", str(run)]) == 0
    split = section((run / "report.md").read_text(), "Step time split (mean seconds per logged step)")
    assert table_row(split, "run") == ["run", "generate", "reward", "learn", "sync", "total"]
    assert table_row(split, "a") == ["a", "2 (20%)", "1 (10%)", "4 (40%)", "1 (10%)", "10"]
