"""The `dsarl` command. Each subcommand lives in its own module of dsarl.launch, imported only when
run, which defines `configure(parser)` (its arguments) and `run(args) -> int` (exit status).

    dsarl <stage> CONFIG [key=value ...] [--resume]     pretrain | warmup | sparse | grpo | run | distill
    dsarl eval CONFIG ...                                 long-context retrieval accuracy by context length
    dsarl submit --address http://HOST:8265 STAGE CONFIG  a stage as a Ray job; jobs | logs ID | stop ID
    dsarl report RUN_DIR [RUN_DIR ...]                    plots and a Markdown summary of runs
"""
import argparse
import importlib
import os
import sys

from dsarl.launch.jobs import EXIT_WITH_PARENT_ENV, exit_with_parent
from dsarl.models.config import ConfigError

# name -> (module, one-line help)
COMMANDS = {
    "pretrain": ("dsarl.launch.stage_pretrain", "LM pretraining of a dense DSA decoder on synthetic task text"),
    "warmup": ("dsarl.launch.stage_conversion", "dense warm-up of the lightning indexer (main model frozen)"),
    "sparse": ("dsarl.launch.stage_conversion", "sparse training: top-k on, indexer trained by its KL alone"),
    "eval": ("dsarl.launch.stage_conversion", "retrieval accuracy by context length, dense and sparse"),
    "grpo": ("dsarl.launch.stage_grpo", "GRPO: Ray rollout and reward workers, the learner, weight sync"),
    "run": ("dsarl.launch.quickstart", "a whole pipeline (configs/quickstart.yaml): pretrain, GRPO, report"),
    "distill": ("dsarl.launch.stage_distill", "train domain specialists with GRPO and distill them into one"),
    "submit": ("dsarl.launch.jobs", "submit a stage as a Ray job to a cluster"),
    "jobs": ("dsarl.launch.jobs", "list Ray jobs"),
    "logs": ("dsarl.launch.jobs", "print a Ray job's logs"),
    "stop": ("dsarl.launch.jobs", "stop a Ray job"),
    "report": ("dsarl.launch.report", "plots and a Markdown summary of one or more run directories"),
}


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every training stage takes."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsarl", description="GRPO post-training for DeepSeek Sparse Attention models")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the command being run: the others may pull in heavy deps
            module = importlib.import_module(module_name)
            module.configure(p, name)
            p.set_defaults(run=module.run)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser(argv)
    # argparse stops a nargs="*" positional at the first flag: `CONFIG --resume k=v` leaves `k=v` over
    args, extra = parser.parse_known_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
