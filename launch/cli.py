"""The `dsarl` command: `dsarl <stage> CONFIG [key=value ...]`.

Each stage loads its typed config (unknown keys and bad values fail with the key and the file named),
writes the resolved config into its run directory, and runs. `--resume` continues from the newest
complete checkpoint in the run directory.
"""
import argparse
import sys
from pathlib import Path

from dsarl.models.config import ConfigError

from .config import load_config, resolve_path, to_yaml


def _resolver(config_path):
    return lambda p: resolve_path(p, config_path)


def _write_resolved(cfg, run_dir) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(to_yaml(cfg))


def cmd_pretrain(args) -> int:
    from dsarl.learner.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    _write_resolved(cfg, cfg.run_dir)
    final = pretrain(cfg, resume=args.resume, resolve=_resolver(cfg.config_path))
    print(f"pretrain: final checkpoint at {final}")
    return 0


STAGES = {
    "pretrain": (cmd_pretrain, "LM pretraining of a dense DSA decoder on synthetic task text"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsarl", description="GRPO post-training for DeepSeek Sparse Attention models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"dsarl: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
