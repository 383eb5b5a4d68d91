"""`dsarl report RUN_DIR [RUN_DIR ...] [--out DIR]`: PNG plots and a Markdown summary of runs.

Reads each run's metrics.jsonl (one line per logged step, written by learner.metrics.MetricsLogger)
and plots whichever metrics exist, several runs overlaid in one colour each:
    reward.png (reward, reward/<component>), accuracy.png, length.png (response_length/*), kl.png,
    entropy.png, loss.png, optim.png (lr, grad_norm), step_time.png (time/* stacked per run),
    other.png (every remaining numeric key).
report.md: per run the final, min, max and best value of every metric, the steps and the wall time;
a table comparing the runs' headline metrics; the mean step-time split. Output goes to --out, by
default the run directory for one run and ./report for several.
"""
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# (file stem, title, key prefixes): a key belongs to a group if it equals a prefix or starts with prefix + "/"
GROUPS = (
    ("reward", "Reward", ("reward",)),
    ("accuracy", "Accuracy", ("accuracy", "pass")),
    ("length", "Response length", ("response_length", "length")),
    ("kl", "KL to the reference", ("kl",)),
    ("entropy", "Entropy", ("entropy",)),
    ("loss", "Loss", ("loss", "unigram_entropy")),
    ("optim", "Optimizer", ("lr", "grad_norm")),
)
TIME_PREFIX = "time/"
STEP_TIME = "time/step"  # the whole step, logged beside its phases: the split's total, not one more phase
HEADLINE = ("reward/mean", "reward", "accuracy", "response_length/mean", "kl", "entropy", "loss")
HIGHER_IS_BETTER = ("reward", "accuracy", "pass")
LOWER_IS_BETTER = ("loss",)


def _in(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + "/") for p in prefixes)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Run:
    name: str
    path: Path
    rows: tuple[dict, ...]  # metrics.jsonl lines in step order

    @property
    def keys(self) -> list[str]:
        seen = {}
        for row in self.rows:
            seen.update({k: None for k, v in row.items() if k not in ("step", "time") and _number(v)})
        return list(seen)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(row["step"], float(row[key])) for row in self.rows if _number(row.get(key))]
        return [s for s, _ in pts], [v for _, v in pts]

    @property
    def last_step(self) -> int:
        return max(row["step"] for row in self.rows)

    @property
    def wall_time_s(self) -> float:
        times = [row["time"] for row in self.rows if _number(row.get("time"))]
        return max(times) - min(times) if times else float("nan")


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{path}: no metrics.jsonl (is it a run directory?)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics}: empty")
    return Run(name or path.resolve().name, path, tuple(sorted(rows, key=lambda r: r["step"])))


def run_names(paths: list[Path]) -> list[str]:
    """Folder names, or their last two parts when folder names repeat."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return ["/".join(p.resolve().parts[-2:]) for p in paths]


# ---------------------------------------------------------------- numbers


@dataclass(frozen=True)
class MetricSummary:
    final: float
    lo: float
    hi: float
    best: float | None  # None where "better" has no direction (lr, length, kl, ...)
    best_step: int | None


def summarise(run: Run, key: str) -> MetricSummary:
    steps, values = run.series(key)
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    lo = min((v for _, v in finite), default=float("nan"))
    hi = max((v for _, v in finite), default=float("nan"))
    pick = max if _in(key, HIGHER_IS_BETTER) else min if _in(key, LOWER_IS_BETTER) else None
    if pick is None or not finite:
        return MetricSummary(values[-1], lo, hi, None, None)
    best_step, best = pick(finite, key=lambda sv: (sv[1], -sv[0]) if pick is max else (sv[1], sv[0]))
    return MetricSummary(values[-1], lo, hi, best, best_step)


def _mean(run: Run, key: str) -> float:
    _, values = run.series(key)
    return sum(values) / len(values)


def phase_keys(run: Run) -> list[str]:
    return [k for k in run.keys if k.startswith(TIME_PREFIX) and k != STEP_TIME]


def time_split(run: Run) -> dict[str, float]:
    """Mean seconds per logged step of each time/<phase> (time/step, the whole step, excluded)."""
    return {key[len(TIME_PREFIX):]: _mean(run, key) for key in phase_keys(run)}


def step_time(run: Run) -> float:
    """Mean seconds per logged step: time/step where the run logs it (it includes what no phase
    timer covers, eval and logging), else the sum of the phases."""
    return _mean(run, STEP_TIME) if STEP_TIME in run.keys else sum(time_split(run).values())


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(round(s % 60)):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


# ---------------------------------------------------------------- Markdown


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(runs: list[Run], plots: list[Path], out: Path) -> str:
    lines = ["# dsarl report", ""]
    if len(runs) > 1:
        keys = [k for k in HEADLINE if any(k in r.keys for r in runs)]
        rows = [[r.name, str(r.last_step), fmt_duration(r.wall_time_s)]
                + [fmt(summarise(r, k).final) if k in r.keys else "-" for k in keys] for r in runs]
        lines += ["## Comparison (final values)", ""] + _table(["run", "steps", "wall time", *keys], rows) + [""]
    splits = {r.name: time_split(r) for r in runs}
    totals = {r.name: step_time(r) for r in runs}
    phases = list(dict.fromkeys(p for s in splits.values() for p in s))
    if phases:
        rows = []
        for name, split in splits.items():
            total = totals[name]
            rows.append([name] + [f"{split[p]:.3g} ({100 * split[p] / total:.0f}%)" if p in split else "-"
                                  for p in phases] + [f"{total:.3g}"])
        lines += ["## Step time split (mean seconds per logged step)", ""]
        lines += _table(["run", *phases, "total"], rows) + [""]
    for r in runs:
        lines += [f"## {r.name}", "", f"- directory: `{r.path}`", f"- steps: {r.last_step} ({len(r.rows)} logged)",
                  f"- wall time: {fmt_duration(r.wall_time_s)} (first to last logged step)", ""]
        rows = []
        for k in r.keys:
            s = summarise(r, k)
            best = f"{fmt(s.best)} (step {s.best_step})" if s.best is not None else "-"
            rows.append([k, fmt(s.final), fmt(s.lo), fmt(s.hi), best])
        lines += _table(["metric", "final", "min", "max", "best"], rows) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _grid(n: int):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes.flat[:n]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    return fig, list(axes.flat[:n])


def plot_group(runs: list[Run], keys: list[str], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys):
        for i, r in enumerate(runs):
            steps, values = r.series(key)
            if steps:
                ax.plot(steps, values, color=f"C{i % 10}", label=r.name, marker="o" if len(steps) <= 20 else None,
                        markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1 or len(keys) == 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_time_split(runs: list[Run], path: Path) -> None:
    import matplotlib.pyplot as plt

    timed = [r for r in runs if time_split(r)]
    fig, axes = _grid(len(timed))
    for ax, r in zip(axes, timed):
        keys = phase_keys(r)
        steps = [row["step"] for row in r.rows if all(_number(row.get(k)) for k in keys)]
        by_step = {row["step"]: row for row in r.rows}
        ax.stackplot(steps, *[[by_step[s][k] for s in steps] for k in keys],
                     labels=[k[len(TIME_PREFIX):] for k in keys], alpha=0.8)
        ax.set_title(r.name)
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Step time split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(runs: list[Run], plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    plot_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in runs for k in r.keys))
    written, grouped = [], set()
    for stem, title, prefixes in GROUPS:
        members = [k for k in keys if _in(k, prefixes)]
        grouped.update(members)
        if members:
            plot_group(runs, members, title, plot_dir / f"{stem}.png")
            written.append(plot_dir / f"{stem}.png")
    if any(phase_keys(r) for r in runs):
        plot_time_split(runs, plot_dir / "step_time.png")
        written.append(plot_dir / "step_time.png")
    other = [k for k in keys if k not in grouped and not k.startswith(TIME_PREFIX)]
    if other:
        plot_group(runs, other, "Other metrics", plot_dir / "other.png")
        written.append(plot_dir / "other.png")
    return written


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Writes OUT/report.md and OUT/plots/*.png for the runs; returns their paths."""
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, run_names(paths))]
    out = Path(out) if out is not None else (paths[0] if len(paths) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out / "plots")
    report = out / "report.md"
    report.write_text(markdown(runs, plots, out))
    return report, plots


def configure(parser, name: str) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default: the run dir; ./report for several)")


def run(args) -> int:
    try:
        report, plots = write_report(args.run_dirs, args.out)
    except ValueError as e:
        print(f"dsarl report: {e}", file=sys.stderr)
        return 2
    print(f"dsarl report: wrote {report} and {len(plots)} plots in {report.parent / 'plots'}")
    return 0
