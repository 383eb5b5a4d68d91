"""`dsarl pretrain CONFIG [overrides] [--resume [CHECKPOINT]]`."""
from pathlib import Path

from .cli import add_stage_arguments
from .config import load_config, resolve_path, to_yaml


def write_resolved_config(cfg, run_dir) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(to_yaml(cfg))


def config_resolver(config_path):
    """Paths inside a config resolve relative to the working directory, then to the config file."""
    return lambda p: resolve_path(p, config_path)


def configure(parser, name: str) -> None:
    add_stage_arguments(parser)


def run(args) -> int:
    from dsarl.learner.pretrain import PretrainConfig, pretrain

    from .preflight import check_logging_packages, check_resume

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    check_logging_packages(cfg)
    check_resume(args.resume, cfg.run_dir)
    write_resolved_config(cfg, cfg.run_dir)
    final = pretrain(cfg, resume=args.resume, resolve=config_resolver(cfg.config_path))
    print(f"pretrain: final checkpoint at {final}")
    return 0
