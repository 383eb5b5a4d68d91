"""`dsarl warmup` and `dsarl sparse`: converting a dense checkpoint into a DSA model (DSA.md section 4.1).

    warmup  main model frozen, attention dense; the indexers trained by the dense KL (eq. 3)
    sparse  top-k on; the main model by the LM loss, the indexers by the KL on S_t (eq. 4), two
            optimizers on disjoint parameters with their own clipping, so neither loss reaches the
            other's parameters
Both read packed task text like `dsarl pretrain` (batches depend only on (seed, step)), log the
indexer KL and the diagnostics of learner/diagnostics.py to metrics.jsonl, write atomic training
checkpoints with exact resume, and end with RUN_DIR/final.
"""
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dsarl.models import save_pretrained

from .checkpointing import load_model_weights, load_training_state, resume_from, save_training_checkpoint
from .diagnostics import model_diagnostics
from .indexer_training import sparse_losses, warmup_losses
from .metrics import MetricsLogger
from .model_spec import ModelSpec, load_model_from_spec
from .optim import OptimConfig, build_optimizer, clip_grad, lr_at, set_lr
from .pretrain import TaskSpec, task_batches


@dataclass
class WarmupConfig:
    model: ModelSpec = field(default_factory=ModelSpec)  # init_from: the dense checkpoint
    task: TaskSpec = field(default_factory=TaskSpec)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5, weight_decay=0.0))
    steps: int = 50
    batch_size: int = 1
    seq_len: int = 2048
    chunk: int = 256  # queries per chunk of the target and the scores: memory O(chunk * seq_len)
    diag_topk: int = 0  # k for the recall diagnostic; 0: seq_len // 16
    diag_every: int = 1  # diagnostics every n steps (they cost about one dense attention pass)
    seed: int = 1
    run_dir: str = "runs/warmup"
    log_every: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    tensorboard: bool = True
    config_path: str | None = None  # filled by the loader


@dataclass
class SparseConfig:
    model: ModelSpec = field(default_factory=ModelSpec)  # init_from the warm-up; overrides attention/index_topk
    task: TaskSpec = field(default_factory=TaskSpec)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=5))  # main model
    indexer_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=5, weight_decay=0.0))
    steps: int = 50
    batch_size: int = 1
    seq_len: int = 2048
    chunk: int = 256  # queries per chunk of the indexer scores
    diag_every: int = 1
    seed: int = 2
    run_dir: str = "runs/sparse"
    log_every: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2
    num_threads: int = 0
    tensorboard: bool = True
    config_path: str | None = None


class OptimizerPair:
    """Two optimizers checkpointed as one (save_training_checkpoint wants one state_dict)."""

    def __init__(self, main, indexer):
        self.main, self.indexer = main, indexer

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), "indexer": self.indexer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.main.load_state_dict(state["main"])
        self.indexer.load_state_dict(state["indexer"])


def split_parameters(model) -> tuple[list, list]:
    """-> (main model parameters, indexer parameters), disjoint."""
    indexer = {id(p) for p in model.indexer_parameters()}
    main = [p for p in model.parameters() if id(p) not in indexer]
    return main, model.indexer_parameters()


def freeze_all_but_indexer(model) -> None:
    """Warm-up: every parameter but the indexers' stops requiring grad (and is in no optimizer)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.indexer_parameters():
        p.requires_grad_(True)


def warmup_step(model, optimizer, ids: torch.Tensor, chunk: int, lr: float, grad_clip: float) -> dict:
    """One warm-up step: only the indexer has requires_grad and only it is in `optimizer`."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    stats = warmup_losses(model, ids[:, :-1], chunk)
    grad_norm = clip_grad(model.indexer_parameters(), grad_clip)
    optimizer.step()
    return {"indexer_kl": stats.indexer_kl, "indexer_grad_norm": grad_norm,
            **{f"indexer_kl/layer{i}": v for i, v in enumerate(stats.kl_per_layer)}}


def sparse_step(model, opt: OptimizerPair, ids: torch.Tensor, chunk: int, lrs: tuple[float, float],
                clips: tuple[float, float], diagnose=None, weights: torch.Tensor | None = None) -> dict:
    """One sparse step. LM and KL graphs are disjoint: one backward of their sum gives each parameter
    set the gradient of its own loss only (tested). `diagnose(out) -> dict` runs before the update;
    `weights` [B, T]: per-target LM-loss weights (task.non_answer_weight), None for the plain mean."""
    set_lr(opt.main, lrs[0])
    set_lr(opt.indexer, lrs[1])
    opt.main.zero_grad(set_to_none=True)
    opt.indexer.zero_grad(set_to_none=True)
    loss, kls, out = sparse_losses(model, ids[:, :-1], ids[:, 1:], chunk, weights)
    kl = kls.mean()
    (loss + kl).backward()
    main_params, index_params = split_parameters(model)
    metrics = {"loss": loss.item(), "indexer_kl": kl.item(), "grad_norm": clip_grad(main_params, clips[0]),
               "indexer_grad_norm": clip_grad(index_params, clips[1]),
               **{f"indexer_kl/layer{i}": v.item() for i, v in enumerate(kls)}}
    if diagnose is not None:
        metrics.update(diagnose(out))
    opt.main.step()
    opt.indexer.step()
    return metrics


def _setup(cfg, resolve):
    if cfg.task.doc_mask:  # the stages run sparse attention and the indexer, which take causal positions only
        raise ValueError("task.doc_mask is for dense pretraining; the conversion stages take one document per "
                         "sequence instead (task.pack: false)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, tokenizer = load_model_from_spec(cfg.model, seed=cfg.seed, resolve=resolve)
    return model, tokenizer, task_batches(tokenizer, cfg.task, cfg.batch_size, cfg.seq_len, cfg.seed)


def _resume(cfg, model, optimizer, resume: bool | str) -> int:
    ckpt = resume_from(cfg.run_dir, resume)
    if ckpt is None:
        return 0
    load_model_weights(model, ckpt)
    return load_training_state(ckpt, optimizer)["step"]


def _check(name: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{name} is {value} at step {step}")


def run_warmup(cfg: WarmupConfig, resume: bool | str = False, resolve=lambda p: p, show_progress: bool = True) -> Path:
    """Trains the indexers of a frozen dense model; returns RUN_DIR/final."""
    model, tokenizer, batch = _setup(cfg, resolve)
    freeze_all_but_indexer(model)
    optimizer = build_optimizer(model.indexer_parameters(), cfg.optim)
    start = _resume(cfg, model, optimizer, resume)
    logger = MetricsLogger(cfg.run_dir, tensorboard=cfg.tensorboard, resume_step=start if start else None)
    topk = cfg.diag_topk or max(1, cfg.seq_len // 16)
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="warmup", disable=not show_progress)
    for step in bar:
        t0 = time.perf_counter()
        ids, _ = batch(step)  # the KL covers every query, whatever the LM-loss weights
        metrics = warmup_step(model, optimizer, ids, cfg.chunk, lr_at(step, cfg.steps, cfg.optim), cfg.optim.grad_clip)
        metrics["step_time_s"] = time.perf_counter() - t0
        _check("warmup: indexer KL", metrics["indexer_kl"], step)
        done = step + 1
        if cfg.diag_every and (done % cfg.diag_every == 0 or done == cfg.steps):
            with torch.no_grad():
                aux = model(ids[:, :-1], attention="dense", collect_aux=True).aux
            metrics.update(model_diagnostics(model, aux, topk, cfg.chunk))
            metrics["diag_topk"] = topk
        if done % cfg.log_every == 0 or done == cfg.steps:
            logger.log(done, metrics)
        bar.set_postfix(kl=f"{metrics['indexer_kl']:.3f}", recall=f"{metrics.get('recall', float('nan')):.3f}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_training_checkpoint(cfg.run_dir, done, model, tokenizer, optimizer,
                                     {"indexer_kl": metrics["indexer_kl"]}, keep=cfg.keep_checkpoints)
    logger.close()
    return save_pretrained(model, Path(cfg.run_dir) / "final", tokenizer)


def run_sparse(cfg: SparseConfig, resume: bool | str = False, resolve=lambda p: p, show_progress: bool = True) -> Path:
    """Sparse training (top-k on) of the whole model; returns RUN_DIR/final (config attention: sparse)."""
    spec = dataclasses.replace(cfg.model, overrides={**cfg.model.overrides, "attention": "sparse"})
    model, tokenizer, batch = _setup(dataclasses.replace(cfg, model=spec), resolve)  # writes a DSA checkpoint
    main_params, index_params = split_parameters(model)
    opt = OptimizerPair(build_optimizer(main_params, cfg.optim), build_optimizer(index_params, cfg.indexer_optim))
    start = _resume(cfg, model, opt, resume)
    logger = MetricsLogger(cfg.run_dir, tensorboard=cfg.tensorboard, resume_step=start if start else None)
    topk = model.config.index_topk
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sparse", disable=not show_progress)
    for step in bar:
        t0 = time.perf_counter()
        ids, weights = batch(step)
        lrs = (lr_at(step, cfg.steps, cfg.optim), lr_at(step, cfg.steps, cfg.indexer_optim))
        done = step + 1
        diagnose = None
        if cfg.diag_every and (done % cfg.diag_every == 0 or done == cfg.steps):
            # the selection this step trained with, against the same model's dense attention
            diagnose = lambda out: model_diagnostics(model, out.aux, topk, cfg.chunk,  # noqa: E731
                                                     [a.indices for a in out.aux])
        metrics = sparse_step(model, opt, ids, cfg.chunk, lrs, (cfg.optim.grad_clip, cfg.indexer_optim.grad_clip),
                              diagnose, weights)
        metrics["step_time_s"] = time.perf_counter() - t0
        _check("sparse: loss", metrics["loss"], step)
        if done % cfg.log_every == 0 or done == cfg.steps:
            logger.log(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", kl=f"{metrics['indexer_kl']:.3f}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_training_checkpoint(cfg.run_dir, done, model, tokenizer, opt, {"loss": metrics["loss"]},
                                     keep=cfg.keep_checkpoints)
    logger.close()
    return save_pretrained(model, Path(cfg.run_dir) / "final", tokenizer)
