"""`dsarl config STAGE [CONFIG] [key=value ...]`: print the config a stage would run with, as YAML.

The stage's defaults, the file on top (if given), the overrides on top of that: the same loading as
the stage itself (`load_config`), so what is printed is what `dsarl STAGE CONFIG ...` would write to
RUN_DIR/config.yaml, and a bad key fails here exactly as it would there.

    dsarl config grpo                                         the defaults
    dsarl config grpo configs/grpo_tiny.yaml steps=5          a file and an override
"""
import importlib
import sys

from .config import load_config, to_yaml

# stage -> (module, schema class): the dataclass each stage loads its config into
STAGE_SCHEMAS = {
    "pretrain": ("dsarl.learner.pretrain", "PretrainConfig"),
    "warmup": ("dsarl.learner.conversion", "WarmupConfig"),
    "sparse": ("dsarl.learner.conversion", "SparseConfig"),
    "eval": ("dsarl.launch.stage_conversion", "EvalConfig"),
    "grpo": ("dsarl.launch.grpo_loop", "GRPOConfig"),
    "run": ("dsarl.launch.quickstart", "PipelineConfig"),
    "distill": ("dsarl.launch.distill_pipeline", "DistillConfig"),
}


def stage_schema(stage: str) -> type:
    module, name = STAGE_SCHEMAS[stage]
    return getattr(importlib.import_module(module), name)


def configure(parser, name: str) -> None:
    parser.add_argument("stage", choices=sorted(STAGE_SCHEMAS), help="the stage whose config to print")
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (default: the stage's defaults)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. steps=5")


def run(args) -> int:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `dsarl config grpo steps=5`: no file, only overrides
        config, overrides = None, [config, *overrides]
    cfg = load_config(stage_schema(args.stage), config, overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0
