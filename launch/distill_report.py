"""The distillation's reports: one run's table, goals, choices and plot; and several seeds' spread.

One run (launch/distill_pipeline.py): report.md, accuracy.png, results.json in its run_dir. Held-out
accuracy is measured once, after every choice was made on validation rows; the report says which.
Several seeds (launch/distill_seeds.py): per model and domain the mean, min and max over seeds, the
student's gap to each specialist per seed, and a pass/fail per seed for the goal (goal_checks).
"""
import json
from pathlib import Path

GOAL_MARGIN = 0.05  # the student within 5 points of each specialist on the specialist's own domain


def report_table(acc: dict[str, dict[str, float]], domains: list[str]) -> str:
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    lines += [f"| {m} | " + " | ".join(f"{100 * row[d]:.1f}" for d in domains) + " |" for m, row in acc.items()]
    return "\n".join(lines)


def goal_checks(acc: dict[str, dict[str, float]], domains: list[str],
                margin: float = GOAL_MARGIN) -> list[tuple[str, bool]]:
    """The issue's bar: the student within `margin` of each specialist on its own domain, above the base on all."""
    st, base = acc["student"], acc["base"]
    out = [(f"student within {100 * margin:.0f} points of the {d} specialist on {d} "
            f"({100 * st[d]:.1f} vs {100 * acc[f'specialist:{d}'][d]:.1f})",
            st[d] >= acc[f"specialist:{d}"][d] - margin - 1e-9) for d in domains]
    out += [(f"student above base on {d} ({100 * st[d]:.1f} vs {100 * base[d]:.1f})", st[d] > base[d]) for d in domains]
    return out


def plot_accuracy(acc: dict[str, dict[str, float]], domains: list[str], out_png: Path, errors=None) -> Path:
    """Grouped bars per domain; `errors[model][domain] = (lo, hi)` draws a min-max bar (several seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(acc)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2.2 * len(domains) + 2, 3.8))
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
        ys = [100 * acc[m][d] for d in domains]
        yerr = None
        if errors is not None:
            yerr = [[y - 100 * errors[m][d][0] for y, d in zip(ys, domains)],
                    [100 * errors[m][d][1] - y for y, d in zip(ys, domains)]]
        ax.bar(xs, ys, width, label=m, yerr=yerr, capsize=2)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("held-out accuracy (%, greedy)"), ax.set_ylim(0, 100), ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def choices_text(choices: dict, num_validation: int) -> list[str]:
    lines = [f"Choices, each read from validation rows only ({num_validation} per domain, disjoint from the "
             "train and held-out rows; held-out rows were read once, for the table above):"]
    if "teachers" in choices:
        lines.append("- on-policy teachers per domain: " + ", ".join(f"{d} <- {'+'.join(ts)}"
                                                                   for d, ts in choices["teachers"].items()))
    if "best_step" in choices:
        lines.append(f"- student kept from on-policy step {choices['best_step']} of {choices['steps_run']} run"
                     + (" (stopped early)" if choices.get("stopped_early") else ""))
    if choices.get("weights"):
        lines.append("- on-policy domain weights (first -> last): "
                     + ", ".join(f"{d} {choices['weights'][0][d]:.2f} -> {choices['weights'][-1][d]:.2f}"
                                 for d in choices["weights"][0]))
    if choices.get("validation"):
        lines.append("- validation accuracy (%) along the way: " + "; ".join(
            f"{v['phase']} {v['step']}: " + " ".join(f"{d} {100 * a:.1f}" for d, a in v["accuracy"].items())
            for v in choices["validation"]))
    lines.append("- SFT data: specialist samples on train rows whose total reward beats sft.reward_threshold")
    return lines


def write_report(root: Path, acc, domains, grpo_evals, sft_metrics, times, choices: dict | None = None,
                 num_validation: int = 0) -> dict:
    table = report_table(acc, domains)
    checks = goal_checks(acc, domains)
    plot = plot_accuracy(acc, domains, root / "accuracy.png")
    text = ["# specialist distillation", "", "Held-out accuracy (%), greedy decoding:", "", table, "",
            "Goals:", *[f"- [{'x' if ok else ' '}] {name}" for name, ok in checks], "",
            *(choices_text(choices, num_validation) + [""] if choices else []),
            "Specialist GRPO evals (own domain, before -> after): "
            + ", ".join(f"{d} {100 * a:.1f} -> {100 * b:.1f}" for d, (a, b) in grpo_evals.items()), "",
            "Times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), "",
            f"![accuracy]({plot.name})", ""]
    (root / "report.md").write_text("\n".join(text))
    results = {"accuracy": acc, "goals": [{"goal": n, "met": ok} for n, ok in checks],
               "passed": all(ok for _, ok in checks), "grpo_evals": grpo_evals, "sft_data": sft_metrics,
               "choices": choices or {}, "times_s": times}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(text[2:-2]))
    return results


# ---- several seeds -----------------------------------------------------------------------------
def spread(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{seed: acc[model][domain]} -> {model: {domain: {mean, min, max}}} over the seeds."""
    first = next(iter(per_seed.values()))
    out = {}
    for m, row in first.items():
        out[m] = {}
        for d in row:
            vals = [acc[m][d] for acc in per_seed.values()]
            out[m][d] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
    return out


def specialist_gaps(acc: dict[str, dict[str, float]], domains: list[str]) -> dict[str, float]:
    """Student minus each specialist, on the specialist's own domain (negative: the student trails)."""
    return {d: acc["student"][d] - acc[f"specialist:{d}"][d] for d in domains}


def write_seed_report(root: Path, per_seed: dict[int, dict], domains: list[str], total_s: float) -> dict:
    """per_seed: {seed: that run's results.json dict}. Writes root/report.md, accuracy.png, results.json."""
    accs = {s: r["accuracy"] for s, r in per_seed.items()}
    sp = spread(accs)
    mean = {m: {d: v["mean"] for d, v in row.items()} for m, row in sp.items()}
    plot = plot_accuracy(mean, domains, root / "accuracy.png",
                         errors={m: {d: (v["min"], v["max"]) for d, v in row.items()} for m, row in sp.items()})
    gaps = {s: specialist_gaps(a, domains) for s, a in accs.items()}
    passed = {s: all(ok for _, ok in goal_checks(a, domains)) for s, a in accs.items()}
    rows = [f"| {m} | " + " | ".join(f"{100 * v['mean']:.1f} ({100 * v['min']:.1f}-{100 * v['max']:.1f})"
                                       for v in row.values()) + " |" for m, row in sp.items()]
    text = ["# specialist distillation over seeds", "",
            f"Held-out accuracy (%), greedy: mean (min-max) over seeds {list(per_seed)}:", "",
            "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains), *rows, "",
            "Student minus each specialist on its own domain (points), and the goal per seed (within "
            f"{100 * GOAL_MARGIN:.0f} points of each specialist, above base on every domain):", "",
            "| seed | " + " | ".join(domains) + " | goal |", "|---|" + "---|" * (len(domains) + 1),
            *[f"| {s} | " + " | ".join(f"{100 * g[d]:+.1f}" for d in domains)
              + f" | {'pass' if passed[s] else 'FAIL'} |" for s, g in gaps.items()], "",
            "Every choice (teachers, on-policy steps kept, domain weights) read validation rows only; "
            "see each seed's report.md.", "",
            f"Total time: {total_s / 60:.1f} min", "", f"![accuracy]({plot.name})", ""]
    (root / "report.md").write_text("\n".join(text))
    results = {"seeds": list(per_seed), "spread": sp, "gaps": {str(s): g for s, g in gaps.items()},
               "passed": {str(s): p for s, p in passed.items()}, "all_passed": all(passed.values()),
               "total_s": total_s, "per_seed": {str(s): r for s, r in per_seed.items()}}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(text[2:-2]))
    return results
