"""`dsarl run configs/quickstart.yaml`: the whole small pipeline on an embedded local Ray.

1. pretrain a tiny DSA model on synthetic arithmetic (short: it is right only part of the time),
2. GRPO on the same task with a rule reward plus length and format terms,
3. print a table of held-out accuracy before and after, and write reward/accuracy plots (PNG) and
   a Markdown summary into the run directory.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsarl.learner.checkpointing import latest_checkpoint
from dsarl.learner.metrics import read_metrics
from dsarl.learner.pretrain import PretrainConfig

from .cli import add_stage_arguments
from .config import load_config
from .grpo_loop import GRPOConfig
from .stage_pretrain import config_resolver, write_resolved_config


@dataclass
class PipelineConfig:
    run_dir: str = "runs/quickstart"  # pretrain/ and grpo/ go below it
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    config_path: str | None = None


def accuracy_table(grpo_run_dir: Path) -> list[tuple[str, int, float]]:
    """(stage, step, held-out accuracy) rows from the GRPO run's eval metrics."""
    rows = [(m["step"], m["eval/accuracy"]) for m in read_metrics(grpo_run_dir) if "eval/accuracy" in m]
    if not rows:
        return []
    first, last = rows[0], rows[-1]
    return [("pretrained", first[0], first[1]), ("after GRPO", last[0], last[1])]


def plot_curves(grpo_run_dir: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in read_metrics(grpo_run_dir) if "reward/mean" in m]
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, [m["reward/mean"] for m in metrics], label="reward (mean)")
    axes[0].set_xlabel("step"), axes[0].set_title("reward"), axes[0].grid(alpha=0.3)
    axes[1].plot(steps, [m["accuracy"] for m in metrics], label="train accuracy (sampled)")
    evals = [m for m in read_metrics(grpo_run_dir) if "eval/accuracy" in m]
    axes[1].plot([m["step"] for m in evals], [m["eval/accuracy"] for m in evals], "o-", label="held-out (greedy)")
    axes[1].set_xlabel("step"), axes[1].set_title("accuracy"), axes[1].legend(), axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def run_pipeline(cfg: PipelineConfig, resume: bool = False, resolve=lambda p: p, show_progress: bool = True) -> dict:
    from dsarl.learner.pretrain import pretrain

    from .grpo_loop import run_grpo

    root = Path(cfg.run_dir)
    cfg.pretrain.run_dir = str(root / "pretrain")
    cfg.grpo.run_dir = str(root / "grpo")
    cfg.grpo.init_from = str(root / "pretrain" / "final")
    write_resolved_config(cfg, root)
    times = {}
    t0 = time.perf_counter()
    if not (resume and (root / "pretrain" / "final" / "config.json").exists()):
        pretrain(cfg.pretrain, resume=resume, resolve=resolve, show_progress=show_progress)
    times["pretrain_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    # resume GRPO only where it checkpointed: a run killed during pretraining starts GRPO afresh
    grpo_started = latest_checkpoint(root / "grpo") is not None
    run_grpo(cfg.grpo, resume=resume and grpo_started, resolve=resolve, show_progress=show_progress)
    times["grpo_s"] = time.perf_counter() - t1
    table = accuracy_table(root / "grpo")
    plot = plot_curves(root / "grpo", root / "reward_accuracy.png")
    lines = ["| model | step | held-out accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {step} | {acc:.3f} |" for name, step, acc in table]
    summary = "\n".join(lines) + f"\n\npretrain {times['pretrain_s']:.0f} s, GRPO {times['grpo_s']:.0f} s\n"
    (root / "summary.md").write_text("# quickstart\n\n" + summary + f"\n![reward and accuracy]({plot.name})\n")
    print(summary)
    return {"table": table, "plot": str(plot), **times}


def configure(parser, name: str) -> None:
    add_stage_arguments(parser)


def run(args) -> int:
    from .preflight import check_pipeline_config

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    resolve = config_resolver(cfg.config_path)
    check_pipeline_config(cfg, resolve, args.resume)  # before run_pipeline: its GRPO part starts Ray
    run_pipeline(cfg, resume=bool(args.resume), resolve=resolve)
    return 0
