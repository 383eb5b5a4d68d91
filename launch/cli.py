"""dsarl: GRPO post-training for DeepSeek Sparse Attention models. Exit status 0 when done, 2 for a
config error (reported before any actor starts).

    dsarl pretrain configs/pretrain_tiny.yaml steps=200
    dsarl grpo configs/grpo_tiny.yaml rollout.num_workers=2 --resume
    dsarl grpo configs/grpo_tiny.yaml --resume runs/grpo-tiny/checkpoints/step_000010
    dsarl run configs/quickstart.yaml
    dsarl distill configs/distill.yaml run_dir=runs/distill-a
    dsarl eval configs/conversion/eval.yaml n=20
    dsarl config grpo configs/grpo_tiny.yaml steps=5
    dsarl submit --address http://127.0.0.1:8265 grpo configs/grpo_tiny.yaml run_dir=/mnt/shared/runs/a
    dsarl report runs/grpo-tiny

`--resume` alone continues from the newest checkpoint in run_dir; `--resume CHECKPOINT` from that
checkpoint directory. `dsarl <command> --help` lists each command's arguments and examples.
"""
import argparse
import importlib
import os
import sys

from dsarl.launch.jobs import EXIT_WITH_PARENT_ENV, exit_with_parent
from dsarl.models.config import ConfigError

# Each subcommand lives in its own module of dsarl.launch, imported only when run, which defines
# `configure(parser, name)` (its arguments) and `run(args) -> int` (the exit status).
# name -> (module, one-line help, examples shown by `dsarl NAME --help`; tests/launch/test_cli_help.py
# parses every one and loads the config it names)
COMMANDS = {
    "pretrain": ("dsarl.launch.stage_pretrain", "LM pretraining of a dense DSA decoder on synthetic task text",
                 ("dsarl pretrain configs/pretrain_tiny.yaml steps=200 optim.lr=1e-3",
                  "dsarl pretrain configs/pretrain_tiny.yaml --resume")),
    "warmup": ("dsarl.launch.stage_conversion", "dense warm-up of the lightning indexer (main model frozen)",
               ("dsarl warmup configs/conversion/warmup.yaml steps=20",)),
    "sparse": ("dsarl.launch.stage_conversion", "sparse training: top-k on, indexer trained by its KL alone",
               ("dsarl sparse configs/conversion/sparse.yaml --resume",)),
    "eval": ("dsarl.launch.stage_conversion", "retrieval accuracy by context length, dense and sparse",
             ("dsarl eval configs/conversion/eval.yaml n=20",)),
    "grpo": ("dsarl.launch.stage_grpo", "GRPO: Ray rollout and reward workers, the learner, weight sync",
             ("dsarl grpo configs/grpo_tiny.yaml steps=20 rollout.num_workers=2",
              "dsarl grpo configs/grpo_tiny.yaml --resume",
              "dsarl grpo configs/grpo_tiny.yaml --resume runs/grpo-tiny/checkpoints/step_000010")),
    "run": ("dsarl.launch.quickstart", "a whole pipeline (configs/quickstart.yaml): pretrain, GRPO, report",
            ("dsarl run configs/quickstart.yaml", "dsarl run configs/quickstart.yaml grpo.steps=10 --resume")),
    "distill": ("dsarl.launch.stage_distill", "train domain specialists with GRPO and distill them into one",
                ("dsarl distill configs/distill.yaml run_dir=runs/distill-a",
                 "dsarl distill configs/distill.yaml --resume")),
    "config": ("dsarl.launch.stage_config", "print a stage's resolved config (YAML): defaults, file, overrides",
               ("dsarl config grpo", "dsarl config grpo configs/grpo_tiny.yaml steps=5 rollout.engine=native")),
    "submit": ("dsarl.launch.jobs", "submit a stage as a Ray job to a cluster",
               ("dsarl submit --address http://127.0.0.1:8265 grpo configs/grpo_tiny.yaml run_dir=/mnt/shared/runs/a",
                "dsarl submit --follow pretrain configs/pretrain_tiny.yaml run_dir=/mnt/shared/runs/pt")),
    "jobs": ("dsarl.launch.jobs", "list Ray jobs", ("dsarl jobs --address http://127.0.0.1:8265",)),
    "logs": ("dsarl.launch.jobs", "print a Ray job's logs", ("dsarl logs raysubmit_XXXX --follow",)),
    "stop": ("dsarl.launch.jobs", "stop a Ray job", ("dsarl stop raysubmit_XXXX --wait",)),
    "report": ("dsarl.launch.report", "plots and a Markdown summary of one or more run directories",
               ("dsarl report runs/grpo-tiny", "dsarl report runs/grpo-a runs/grpo-b --out report")),
}


def add_resume_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT", help=help_text)


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every training stage takes."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4")
    add_resume_argument(parser, "continue from the newest checkpoint in run_dir, or from the checkpoint "
                                "directory CHECKPOINT")


def _examples(lines) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsarl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text, examples) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_examples(examples),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == wanted:  # import only the command being run: the others may pull in heavy deps
            module = importlib.import_module(module_name)
            module.configure(p, name)
            p.set_defaults(run=module.run)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser(argv)
    # argparse stops a nargs="*" positional at the first flag: `CONFIG --resume k=v` leaves `k=v` over
    args, extra = parser.parse_known_args(argv)
    # `--resume` takes an optional CHECKPOINT, so in `CONFIG --resume k=v` it would take the override
    if isinstance(getattr(args, "resume", None), str) and "=" in args.resume and not os.path.exists(args.resume):
        extra, args.resume = [args.resume, *extra], True
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and os.environ.get(EXIT_WITH_PARENT_ENV) == "1":  # run as a Ray job's entrypoint
        exit_with_parent()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"dsarl: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not isinstance(e, _run_stopped_errors()):
            raise
        # the run stopped itself on purpose: its message says why (a reward's first traceback included)
        print(f"dsarl: run stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return 3


def _run_stopped_errors() -> tuple[type[BaseException], ...]:
    """Errors a run raises to stop on purpose (a reward that always fails, a learner stuck on NaN)."""
    from dsarl.launch.grpo_loop import RewardWorkersLost
    from dsarl.learner.grpo_learner import NonFiniteError
    from dsarl.rewards.health import RewardComponentDead

    return RewardComponentDead, NonFiniteError, RewardWorkersLost


if __name__ == "__main__":
    sys.exit(main())
