"""`dsarl grpo CONFIG [overrides] [--resume [CHECKPOINT]]`."""
from pathlib import Path

from dsarl.models.config import ConfigError

from .cli import add_stage_arguments
from .config import load_config
from .stage_pretrain import config_resolver, write_resolved_config


def _check_trainer_resumes_from(resume, run_dir: str) -> None:
    """GRPOTrainer (launch/grpo_loop.py) still resumes from the newest checkpoint in run_dir whatever
    path it is given: refuse any other path rather than silently resume from another checkpoint.
    Goes once the trainer takes `resume` as a path (issue #19 item 15)."""
    from dsarl.learner.checkpointing import latest_checkpoint

    newest = latest_checkpoint(run_dir)
    if isinstance(resume, str) and (newest is None or Path(resume).resolve() != newest.resolve()):
        raise ConfigError(f"--resume {resume}: dsarl grpo resumes only from the newest checkpoint in run_dir "
                          f"({newest or f'none in {run_dir}'}) for now; pass that one or --resume alone")


def configure(parser, name: str) -> None:
    add_stage_arguments(parser)


def run(args) -> int:
    from .grpo_loop import GRPOConfig, run_grpo
    from .preflight import check_grpo_config

    cfg = load_config(GRPOConfig, args.config, args.overrides)
    resolve = config_resolver(cfg.config_path)
    check_grpo_config(cfg, resolve, args.resume)  # before run_grpo: its trainer starts Ray first thing
    _check_trainer_resumes_from(args.resume, cfg.run_dir)
    write_resolved_config(cfg, cfg.run_dir)
    # resume: False, True (newest checkpoint in run_dir) or a checkpoint directory
    final = run_grpo(cfg, resume=args.resume, resolve=resolve)
    print(f"grpo: final checkpoint at {final}")
    return 0
