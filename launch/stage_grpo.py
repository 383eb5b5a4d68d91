"""`dsarl grpo CONFIG [overrides] [--resume]`."""
from .cli import add_stage_arguments
from .config import load_config
from .stage_pretrain import config_resolver, write_resolved_config


def configure(parser, name: str) -> None:
    add_stage_arguments(parser)


def run(args) -> int:
    from .grpo_loop import GRPOConfig, run_grpo

    cfg = load_config(GRPOConfig, args.config, args.overrides)
    write_resolved_config(cfg, cfg.run_dir)
    final = run_grpo(cfg, resume=args.resume, resolve=config_resolver(cfg.config_path))
    print(f"grpo: final checkpoint at {final}")
    return 0
