"""`dsarl grpo CONFIG [overrides] [--resume [CHECKPOINT]]`."""
from .cli import add_stage_arguments
from .config import load_config
from .stage_pretrain import config_resolver, write_resolved_config


def configure(parser, name: str) -> None:
    add_stage_arguments(parser)


def run(args) -> int:
    from .grpo_loop import GRPOConfig, run_grpo
    from .preflight import check_grpo_config

    cfg = load_config(GRPOConfig, args.config, args.overrides)
    resolve = config_resolver(cfg.config_path)
    check_grpo_config(cfg, resolve, args.resume)  # before run_grpo: its trainer starts Ray first thing
    write_resolved_config(cfg, cfg.run_dir)
    # resume: False, True (newest checkpoint in run_dir) or a checkpoint directory
    final = run_grpo(cfg, resume=args.resume, resolve=resolve)
    print(f"grpo: final checkpoint at {final}")
    return 0
