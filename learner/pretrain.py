"""`dsarl pretrain`: language-model training of a (dense) DSA decoder on synthetic task text or a text / chat
dataset (task.path).

AdamW, warmup + cosine schedule, gradient clipping, a progress bar, metrics.jsonl, atomic checkpoints
and exact resume (batches depend only on (seed, step); optimizer and RNG state are checkpointed).
Logs the unigram entropy of the training text as the baseline the loss must beat.
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dsarl.data.retrieval_docs import lm_batch
from dsarl.models import save_pretrained
from dsarl.models.doc_mask import document_ids

from .checkpointing import load_model_weights, load_training_state, resume_from, save_training_checkpoint
from .metrics import MetricsLogger
from .model_spec import ModelSpec, load_model_from_spec
from .optim import OptimConfig, build_optimizer, clip_grad, lr_at, set_lr


@dataclass
class TaskSpec:
    name: str = "arithmetic"  # a task registered in dsarl.data.tasks (unless `path` is set)
    # A text or chat dataset instead of the task (data/datasets.py load_rows: a file, a directory of files, a
    # saved dataset or a datasets name). Each row's `text_key` is a document: a string (bos + text + eos) or a
    # list of {role, content} messages (the chat template, no generation prompt); data/text_data.py.
    path: str | None = None
    text_key: str = "text"
    split: str = "train"
    subset: str | None = None  # a datasets name's config
    limit: int | None = None  # only the first `limit` rows (None: all)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # LM-loss weight of the tokens that are not answers (answers weigh 1): 1 is the plain LM loss;
    # 0 trains on answers only (data/retrieval_docs.py; documents there, e.g. kv_multi_query, need it)
    non_answer_weight: float = 1.0
    eos_prob: float = 1.0  # share of documents ending with eos (else the next follows): < 1 = a base that rambles
    # documents packed end to end (true), or one per sequence from position 0, right-padded (false): a
    # query then sees only its own document (data/retrieval_docs.py packed_lm_batch_with_mask)
    pack: bool = True
    # packed documents see only themselves, from position 0, as at inference (models/doc_mask.py);
    # dense attention only
    doc_mask: bool = False


def task_batches(tokenizer, task: TaskSpec, batch_size: int, seq_len: int, seed: int, resolve=lambda p: p):
    """step -> (ids [B, seq_len + 1], loss weights or None): the task's batches, each fixed by (seed, step)."""
    if task.path is not None:
        return dataset_batches(tokenizer, task, batch_size, seq_len, seed, resolve)
    return lambda step: lm_batch(tokenizer, task.name, task.kwargs, task.non_answer_weight, batch_size, seq_len,
                                 seed, step, task.pack, task.eos_prob)


def dataset_batches(tokenizer, task: TaskSpec, batch_size: int, seq_len: int, seed: int, resolve):
    """step -> (ids, None): the dataset's documents packed end to end (data/text_data.py), fixed by (seed, step)."""
    from dsarl.data.datasets import load_rows, local_or_name
    from dsarl.data.text_data import load_documents, packed_document_batch

    if task.non_answer_weight != 1.0 or not task.pack or task.eos_prob != 1.0:
        raise ValueError(f"task.path={task.path!r}: non_answer_weight, pack and eos_prob shape the synthetic tasks' "
                         f"documents only; leave them at 1.0, true, 1.0 with a dataset")
    rows = load_rows(local_or_name(task.path, resolve), task.split, task.limit, task.subset)
    docs = load_documents(tokenizer, rows, task.text_key, task.path)
    return lambda step: (packed_document_batch(docs, batch_size, seq_len, seed, step), None)


@dataclass
class PretrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    run_dir: str = "runs/pretrain"
    log_every: int = 10
    save_every: int = 100  # training checkpoint every n steps (and at the end)
    keep_checkpoints: int = 2
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # + weight * mean entropy (nats) of every head's attention (learner/attention_entropy.py): heads
    # no loss term needs concentrate instead of spreading over the context; 0 = plain LM loss
    attention_entropy_weight: float = 0.0
    attention_entropy_queries: int = 0  # queries per sequence the penalty averages over (drawn per step); 0 = all
    tensorboard: bool = True  # metrics.jsonl is always written; TensorBoard events too by default
    wandb_project: str | None = None  # also log to Weights & Biases (pip install wandb)
    mlflow_experiment: str | None = None  # also log to MLflow (pip install mlflow)
    config_path: str | None = None  # filled by the loader: the YAML this came from


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # fp32 log-softmax


def weighted_lm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum_t w_t CE_t / sum_t w_t; the plain mean (lm_loss) when weights is None."""
    if weights is None:
        return lm_loss(logits, targets)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # fp32 log-softmax
    w = weights.flatten().to(ce.device)
    return (ce * w).sum() / w.sum().clamp(min=1e-8)


def unigram_entropy(batches: list[torch.Tensor], vocab_size: int) -> float:
    """Entropy (nats/token) of the token distribution: the loss of the best context-free model."""
    counts = torch.bincount(torch.cat([b[:, 1:].flatten() for b in batches]), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def lm_loss_and_attention_entropy(model, cfg: PretrainConfig, inputs, targets, weights, step: int):
    """(weighted LM loss, mean attention entropy of the real queries, or of attention_entropy_queries of
    them per sequence drawn from (seed, step), so a resumed run draws the same)."""
    from .attention_entropy import attention_entropy, sample_queries  # here: it imports indexer_training, which imports us

    out = model(inputs, collect_aux=True)
    queries = torch.ones_like(inputs, dtype=torch.bool) if weights is None else weights > 0  # not padding
    if cfg.attention_entropy_queries:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        queries = sample_queries(queries, cfg.attention_entropy_queries, g)
    return weighted_lm_loss(out.logits, targets, weights), attention_entropy(model, out.aux, queries)


def pretrain(cfg: PretrainConfig, resume: bool | str = False, resolve=lambda p: p, show_progress: bool = True) -> Path:
    """Trains and returns the final checkpoint directory RUN_DIR/final. resume: True continues from the
    newest checkpoint in run_dir, a path from that checkpoint directory."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.attention_entropy_weight > 0 and cfg.task.doc_mask:
        raise ValueError("pretrain: attention_entropy_weight needs the unmasked dense path; set task.doc_mask: false")
    run_dir = Path(cfg.run_dir)
    model, tokenizer = load_model_from_spec(cfg.model, seed=cfg.seed, resolve=resolve)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    start = 0
    ckpt = resume_from(run_dir, resume)
    if ckpt is not None:
        load_model_weights(model, ckpt)
        start = load_training_state(ckpt, optimizer)["step"]
    torch.manual_seed(cfg.seed + start)
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                           mlflow_experiment=cfg.mlflow_experiment, resume_step=start if ckpt else None)
    if cfg.task.doc_mask and tokenizer.bos_id is None:
        raise ValueError("pretrain: task.doc_mask splits documents at bos, and this tokenizer has no bos token")
    batch = task_batches(tokenizer, cfg.task, cfg.batch_size, cfg.seq_len, cfg.seed, resolve)
    baseline = unigram_entropy([batch(-1 - i)[0] for i in range(4)], model.config.vocab_size)
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain", disable=not show_progress)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.optim)
        set_lr(optimizer, lr)
        ids, weights = batch(step)
        inputs = ids[:, :-1]
        doc_ids = document_ids(inputs, tokenizer.bos_id) if cfg.task.doc_mask else None
        extra = {}
        if cfg.attention_entropy_weight > 0:
            loss, entropy = lm_loss_and_attention_entropy(model, cfg, inputs, ids[:, 1:], weights, step)
            total = loss + cfg.attention_entropy_weight * entropy
            extra["attention_entropy"] = entropy.item()
        else:
            loss = total = weighted_lm_loss(model(inputs, doc_ids=doc_ids).logits, ids[:, 1:], weights)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = clip_grad(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        dt = time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"pretrain: loss is {loss.item()} at step {step}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            logger.log(done, {"loss": loss.item(), "unigram_entropy": baseline, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": ids[:, :-1].numel() / dt, "step_time_s": dt, **extra})
        bar.set_postfix(loss=f"{loss.item():.3f}", base=f"{baseline:.3f}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_training_checkpoint(run_dir, done, model, tokenizer, optimizer, {"loss": loss.item()},
                                     keep=cfg.keep_checkpoints)
    logger.close()
    return save_pretrained(model, run_dir / "final", tokenizer)
