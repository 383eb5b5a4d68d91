"""Metrics sinks: `metrics.jsonl` always (one line per step), TensorBoard by default, and
Weights & Biases or MLflow when configured (each imported only if asked for)."""
import json
import math
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 mlflow_experiment: str | None = None, resume_step: int | None = None, run_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # A resumed run rewrites the steps after its checkpoint: drop the old lines for them.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
