"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""
import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no decay on norms and biases
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused AdamW updates every tensor in one kernel: 9.7 -> 1.6 ms a step for a 3.3M-parameter
    # model on 2 CPU cores against the default for-each form (same maths, float rounding apart)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup for warmup_steps, then cosine from lr to lr * min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad(params, max_norm: float) -> float:
    """Clips the gradients' global norm to max_norm (0: only measures it). -> the norm before clipping.
    Sharded (DTensor) gradients: the norm is of the full gradient, the same number on every rank."""
    params = [p for p in params if p.grad is not None]
    if params and isinstance(params[0].grad, DTensor):
        total = torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor()  # reduced over shards
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)
    if max_norm <= 0:
        return float(torch.norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
