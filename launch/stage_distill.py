"""`dsarl distill CONFIG [overrides] [--resume]`: specialists by GRPO, one student by distillation, a report;
`seeds=[0,1,2]`: all of it per seed and the spread over seeds."""
from .cli import add_stage_arguments
from .config import load_config
from .stage_pretrain import config_resolver


def configure(parser, name: str) -> None:
    add_stage_arguments(parser)


def run(args) -> int:
    from .distill_pipeline import DistillConfig, run_distill
    from .distill_seeds import run_seeds, seed_config
    from .preflight import check_distill_config

    cfg = load_config(DistillConfig, args.config, args.overrides)
    resolve = config_resolver(cfg.config_path)
    # before run_distill starts Ray; with seeds, the first seed's run (its run_dir is what --resume finds)
    check_distill_config(seed_config(cfg, cfg.seeds[0], None) if cfg.seeds else cfg, resolve, args.resume)
    run = run_seeds if cfg.seeds else run_distill  # seeds: one whole pipeline per seed, then the spread
    results = run(cfg, resume=bool(args.resume), resolve=resolve)
    print(f"distill: report at {cfg.run_dir}/report.md")
    return 0 if results.get("accuracy") or results.get("per_seed") else 1
