"""`dsarl distill CONFIG seeds=[0,1,2]`: the whole pipeline once per seed, then the spread.

Each seed runs in run_dir/seed<k> with `seed: k` (its base, specialists, rows, samples and student all
follow from k), and run_dir/report.md gives the mean, min and max of every model on every domain, the
student's gap to each specialist per seed and the goal's pass/fail per seed (launch/distill_report.py).
`reuse_specialists: true` trains the base and the specialists for the first seed only and gives the
later seeds those checkpoints (base, domains[i].checkpoint): the spread then measures the student's
variance alone. With --resume a finished seed is not run again (each stage resumes as in one run).
"""
import copy
import time
from pathlib import Path

from .distill_pipeline import DistillConfig, run_distill
from .distill_report import write_seed_report


def seed_config(cfg: DistillConfig, seed: int, first: int | None) -> DistillConfig:
    """The single-seed config of `seed`; `first`: the seed whose base and specialists to reuse (or None)."""
    c = copy.deepcopy(cfg)
    c.seed, c.seeds, c.run_dir = seed, [], str(Path(cfg.run_dir) / f"seed{seed}")
    if first is not None and seed != first:
        src = Path(cfg.run_dir) / f"seed{first}"
        if c.base is None:
            c.base = str(src / "base" / "final")
        for e in c.domains:
            if not e.checkpoint:
                e.checkpoint = str(src / "specialists" / e.name / "final")
    return c


def run_seeds(cfg: DistillConfig, resume: bool = False, resolve=lambda p: p, show_progress: bool = True) -> dict:
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds must be distinct, got {cfg.seeds}")
    t = time.perf_counter()
    first = cfg.seeds[0] if cfg.reuse_specialists else None
    per_seed = {}
    for s in cfg.seeds:
        print(f"distill: seed {s} ({cfg.seeds.index(s) + 1} of {len(cfg.seeds)})")
        per_seed[s] = run_distill(seed_config(cfg, s, first), resume=resume, resolve=resolve,
                                  show_progress=show_progress)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    return write_seed_report(Path(cfg.run_dir), per_seed, [e.name for e in cfg.domains], time.perf_counter() - t)
