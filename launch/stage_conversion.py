"""`dsarl warmup CONFIG`, `dsarl sparse CONFIG` (the DSA conversion stages) and `dsarl eval CONFIG`
(retrieval accuracy by context length, dense / sparse / random selection, for one or more checkpoints).

    dsarl warmup configs/conversion/warmup.yaml [key=value ...] [--resume [CHECKPOINT]]
    dsarl sparse configs/conversion/sparse.yaml [key=value ...] [--resume [CHECKPOINT]]
    dsarl eval configs/conversion/eval.yaml [key=value ...]
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cli import add_stage_arguments
from .config import load_config
from .stage_pretrain import config_resolver, write_resolved_config


@dataclass
class EvalModel:
    label: str = "model"
    checkpoint: str = ""  # checkpoint directory
    modes: list[str] = field(default_factory=lambda: ["dense", "sparse"])  # dense | sparse | random


@dataclass
class EvalConfig:
    models: list[EvalModel] = field(default_factory=list)
    index_topk: int = 128  # k of the sparse and random modes
    context_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    n: int = 50  # examples per context length
    batch_size: int = 4
    task: str = "kv_retrieval"
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # as in pretraining, except context_len
    seed: int = 0
    num_threads: int = 0
    run_dir: str = "runs/eval"
    config_path: str | None = None


def configure(parser, name: str) -> None:
    if name == "eval":
        parser.add_argument("config", help="YAML config file")
        parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. n=20")
    else:
        add_stage_arguments(parser)


def run_eval(cfg: EvalConfig, resolve=lambda p: p, log=print) -> list:
    import torch

    from dsarl.learner.retrieval_eval import accuracy_table, retrieval_accuracy
    from dsarl.models import from_pretrained

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    results = []
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "eval.jsonl").open("w") as f:
        for spec in cfg.models:
            model, tok = from_pretrained(resolve(spec.checkpoint), index_topk=cfg.index_topk,
                                         max_position_embeddings=max(4096, max(cfg.context_lens) + 64))
            model.eval()
            for mode in spec.modes:
                for L in cfg.context_lens:
                    r = retrieval_accuracy(model, tok, L, cfg.n, mode, spec.label, cfg.task, cfg.task_kwargs,
                                           cfg.seed, cfg.batch_size)
                    results.append(r)
                    f.write(json.dumps(asdict(r)) + "\n")
                    f.flush()
                    log(json.dumps(asdict(r)))
    table = accuracy_table(results)
    (run_dir / "eval.md").write_text(table + "\n")
    log(table)
    return results


def run(args) -> int:
    from dsarl.learner.conversion import SparseConfig, WarmupConfig, run_sparse, run_warmup

    from .preflight import check_resume

    if args.command == "eval":
        cfg = load_config(EvalConfig, args.config, args.overrides)
        write_resolved_config(cfg, cfg.run_dir)
        run_eval(cfg, resolve=config_resolver(cfg.config_path))
        return 0
    schema, stage = {"warmup": (WarmupConfig, run_warmup), "sparse": (SparseConfig, run_sparse)}[args.command]
    cfg = load_config(schema, args.config, args.overrides)
    check_resume(args.resume, cfg.run_dir)
    write_resolved_config(cfg, cfg.run_dir)
    final = stage(cfg, resume=args.resume, resolve=config_resolver(cfg.config_path))
    print(f"{args.command}: final checkpoint at {final}")
    return 0
