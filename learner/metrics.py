"""Metrics sinks: `metrics.jsonl` always (one line per step), TensorBoard by default, and
Weights & Biases or MLflow when configured (each imported only if asked for)."""
import json
import math
import time
import warnings
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 mlflow_experiment: str | None = None, resume_step: int | None = None, run_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # A resumed run rewrites the steps after its checkpoint: drop the old lines for them.
            self.rewind(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._tb = self._wandb = self._mlflow = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=run_name or self.run_dir.name, dir=str(self.run_dir))
        if mlflow_experiment:
            import mlflow

            mlflow.set_experiment(mlflow_experiment)
            self._mlflow = mlflow.start_run(run_name=run_name or self.run_dir.name)

    def rewind(self, step: int) -> None:
        """Drops the lines of steps after `step` (a learner restarted from that step's checkpoint)."""
        kept = [rec for rec in parse_metrics_lines(self.path) if rec.get("step", 0) <= step] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(rec, allow_nan=True) + "\n" for rec in kept))

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        line = {"step": step, "time": time.time(), **clean}
        with self.path.open("a") as f:
            f.write(json.dumps(line, allow_nan=True) + "\n")
        scalars = {k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            import mlflow

            mlflow.end_run()


def parse_metrics_lines(path: Path) -> list[dict]:
    """metrics.jsonl's records. A torn line (a kill mid-write leaves the last one cut short) is dropped
    with a warning naming the file and line; a torn line elsewhere is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({e}); only a torn last line is skipped") from None
            warnings.warn(f"{path}: dropping a torn last line {i + 1} (a run killed mid-write): {line[:80]!r}")
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return parse_metrics_lines(path) if path.exists() else []
