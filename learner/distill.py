"""The student's learner for specialist distillation: SFT on filtered specialist rollouts, and
on-policy distillation by the exact reverse KL to the specialist of each prompt's domain.

    SFT   loss = mean over completion tokens of -log pi_s(y_t | x, y_<t), on specialist samples whose
          reward beat a threshold (rejection sampling, `distill_loss.rejection_filter`)
    OPD   the student samples y ~ pi_s; the teacher returns log pi_t(. | x, y_<t) over the whole
          vocabulary at every completion position; loss = mean over tokens of KL(pi_s || pi_t)
          (`distill_loss.distill_loss`, full vocabulary, fp32, teacher detached)
Both are token-level means over the batch (as grpo_loss); `Distiller.step` takes either or both, so
the methods combine in one update as `sft_coef * SFT + kl_coef * OPD`.

Notable choices:
- One padded forward per batch of (prompt + completion) sequences, right-padded: causal attention
  keeps padding out of every real position. Prompts differ across domains, so the shared-prefix
  layout of grpo_learner.group_forward buys little here; the logit at position len(prompt) - 1 + t
  predicts completion token t, exactly as there.
- The exact KL needs the teacher's whole distribution, not only the sampled token's logprob (the
  rollout engine's `score`): `completion_log_probs` computes it, and the teacher workers run it
  (actors/teacher_pool.py). For a vocabulary of 264 byte tokens that is cheap to ship; a large
  vocabulary would ship top-k only (as verl / NeMo-RL do), which this module does not do.
- The student samples at temperature 1 and the KL is of the temperature-1 distributions.

Run the tests: `pytest tests/learner/test_distill.py`.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distill_loss import distill_loss
from .optim import OptimConfig, build_optimizer, clip_grad, set_lr


@dataclass(frozen=True)
class Sequences:
    """A batch of (prompt, completion) token-id pairs: specialist samples (SFT) or student samples (OPD)."""

    prompts: list[list[int]]
    completions: list[list[int]]

    def __post_init__(self):
        if len(self.prompts) != len(self.completions):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.completions)} completions")
        for i, c in enumerate(self.completions):
            if not c:
                raise ValueError(f"completions[{i}] is empty")


def pad_sequences(seqs: Sequences, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids [B, T] (prompt + completion, right-padded), positions [B, Lc] of the logits that predict
    each completion token, targets [B, Lc] (the completion tokens, pad beyond), mask [B, Lc] bool."""
    B = len(seqs.prompts)
    T = max(len(p) + len(c) for p, c in zip(seqs.prompts, seqs.completions))
    Lc = max(len(c) for c in seqs.completions)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, Lc, dtype=torch.long)
    targets = torch.full((B, Lc), pad_id, dtype=torch.long)
    mask = torch.zeros(B, Lc, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(seqs.prompts, seqs.completions)):
        ids[b, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
        pos[b, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        targets[b, : len(c)] = torch.tensor(c)
        mask[b, : len(c)] = True
    return ids, pos, targets, mask


def completion_logits(model, seqs: Sequences, attention: str | None = None):
    """-> (logits [B, Lc, V] predicting each completion token, targets [B, Lc], mask [B, Lc])."""
    ids, pos, targets, mask = pad_sequences(seqs, model.config.pad_token_id)
    device = next(model.parameters()).device
    logits = model(ids.to(device), attention=attention or model.config.attention).logits  # [B, T, V]
    rows = torch.arange(ids.shape[0], device=device)[:, None]  # [B, 1]
    return logits[rows, pos.to(device)], targets.to(device), mask.to(device)  # [B, Lc, V]


@torch.no_grad()
def completion_log_probs(model, seqs: Sequences, temperature: float = 1.0, attention: str | None = None,
                         batch_size: int = 64) -> list[torch.Tensor]:
    """The teacher's side of OPD: log pi(. | prompt, completion_<t) for every completion position.

    Returns one fp32 [len(completion), V] tensor per sequence, on the CPU."""
    out = []
    for b0 in range(0, len(seqs.prompts), batch_size):
        part = Sequences(seqs.prompts[b0:b0 + batch_size], seqs.completions[b0:b0 + batch_size])
        logits, _, _ = completion_logits(model, part, attention)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1).cpu()  # fp32 for the log-softmax
        out += [logp[i, : len(c)] for i, c in enumerate(part.completions)]
    return out


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
             normalizer: float | None = None) -> torch.Tensor:
    """Token-level mean negative log-likelihood over the unmasked tokens.

    Args: logits [B, Lc, V]; targets [B, Lc] int64; mask [B, Lc] bool; normalizer: token count to
    divide by (default the unmasked tokens here). Returns a 0-dim fp32 tensor."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # [B*Lc] fp32
    denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    return (nll * mask.flatten()).sum() / denom


def pad_teacher(teacher_logp: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Per-sequence [Lc_i, V] teacher log-probs -> [B, Lc, V], zero (uniform logits) beyond each end."""
    out = torch.zeros(shape, dtype=torch.float32)
    for b, t in enumerate(teacher_logp):
        if t.shape[1] != shape[2]:
            raise ValueError(f"teacher_logp[{b}] has vocabulary {t.shape[1]}, student {shape[2]}")
        out[b, : t.shape[0]] = t
    return out


class Distiller:
    """The student: a model and its AdamW. `step` is one optimizer step on SFT and/or OPD batches."""

    def __init__(self, model, optim: OptimConfig, micro_batch: int = 64, attention: str | None = None):
        self.model, self.optim_cfg, self.micro_batch = model, optim, micro_batch
        self.attention = attention or model.config.attention
        self.optimizer = build_optimizer(model.parameters(), optim)

    def _micro(self, seqs: Sequences, teacher: list[torch.Tensor] | None):
        for b0 in range(0, len(seqs.prompts), self.micro_batch):
            part = Sequences(seqs.prompts[b0:b0 + self.micro_batch], seqs.completions[b0:b0 + self.micro_batch])
            yield part, None if teacher is None else teacher[b0:b0 + self.micro_batch]

    def step(self, lr: float, sft: Sequences | None = None, opd: Sequences | None = None,
             teacher_logp: list[torch.Tensor] | None = None, sft_coef: float = 1.0,
             kl_coef: float = 1.0) -> dict[str, float]:
        """loss = sft_coef * SFT(sft) + kl_coef * mean reverse KL(opd || teacher_logp); one AdamW step."""
        if sft is None and opd is None:
            raise ValueError("Distiller.step needs sft and/or opd sequences")
        if (opd is None) != (teacher_logp is None):
            raise ValueError("opd sequences and teacher_logp go together")
        self.model.train()
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        if sft is not None:
            n = float(sum(len(c) for c in sft.completions))
            total = 0.0
            for part, _ in self._micro(sft, None):
                logits, targets, mask = completion_logits(self.model, part, self.attention)
                loss = sft_loss(logits, targets, mask, normalizer=n)
                (sft_coef * loss).backward()
                total += loss.item()
            metrics.update({"sft/loss": total, "sft/tokens": n})
        if opd is not None:
            n = float(sum(len(c) for c in opd.completions))
            total = 0.0
            for part, teach in self._micro(opd, teacher_logp):
                logits, _, mask = completion_logits(self.model, part, self.attention)
                target = pad_teacher(teach, logits.shape).to(logits.device)
                loss = distill_loss(logits, target, mask, normalizer=n)
                (kl_coef * loss).backward()
                total += loss.item()
            metrics.update({"opd/reverse_kl": total, "opd/tokens": n})
        metrics["grad_norm"] = clip_grad(self.model.parameters(), self.optim_cfg.grad_clip)
        self.optimizer.step()
        return metrics
