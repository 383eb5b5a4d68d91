"""Long-context retrieval accuracy (key-value / passkey, data/tasks.py) by context length.

Exact match of greedy decoding equals "under teacher forcing, the argmax at every answer position is
the answer token": if the first answer token is the argmax, greedy decoding emits it and sees the same
prefix as teacher forcing at the next position, and so on. So one forward pass per example scores it,
with no generation engine. Rows of one context length are batched with right padding (causal
attention: tokens after a row's answer cannot change its answer logits).

Modes: `dense`, `sparse` (the model's indexer at index_topk), `random` (sparse attention with each
query's S_t drawn uniformly from its visible keys: what an indexer that knows nothing selects).
"""
from dataclasses import dataclass

import torch

from dsarl.data.tasks import make_rows


@dataclass(frozen=True)
class RetrievalResult:
    label: str  # which checkpoint / variant
    mode: str  # dense | sparse | random
    context_len: int
    index_topk: int | None
    n: int
    accuracy: float  # exact match of every answer token
    token_accuracy: float  # share of answer tokens that are the argmax


def encode_rows(tokenizer, rows: list[dict]) -> tuple[list[list[int]], list[int]]:
    """-> (token ids of bos + prompt + answer, index of the first answer token) per row."""
    seqs, starts = [], []
    for row in rows:
        prompt = [tokenizer.bos_id, *tokenizer.encode(row["prompt"])]
        seqs.append(prompt + tokenizer.encode(row["answer"]))
        starts.append(len(prompt))
    return seqs, starts


def random_indices(positions: torch.Tensor, topk: int, n_layers: int, seed: int) -> list[torch.Tensor]:
    """Per layer [B, T, topk] int32: each query's topk keys drawn uniformly from 0..t (all if t < topk)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        B, T = positions.shape
        noise = torch.rand(B, T, T, generator=g)  # [B, T, S] random scores
        visible = positions[:, None, :] <= positions[:, :, None]
        scores = noise.masked_fill(~visible, float("-inf"))
        kk = min(topk, T)
        vals, idx = scores.topk(kk, dim=-1)
        idx = idx.to(torch.int32).masked_fill(torch.isinf(vals), -1)
        if kk < topk:
            idx = torch.cat([idx, idx.new_full((B, T, topk - kk), -1)], dim=-1)
        out.append(idx)
    return out


@torch.no_grad()
def score_batch(model, seqs: list[list[int]], starts: list[int], mode: str, pad_id: int, seed: int = 0):
    """-> (exact [n] bool, correct tokens [n], answer tokens [n]) for one padded batch."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    ids = ids.to(model.device)
    indices = None
    if mode == "random":
        positions = torch.arange(T)[None].expand(len(seqs), T)
        indices = [i.to(model.device) for i in
                   random_indices(positions, model.config.index_topk, model.config.num_hidden_layers, seed)]
    attention = "dense" if mode == "dense" else "sparse"
    first = min(starts) - 1  # logits from the position before the first answer token on
    logits = model(ids, attention=attention, indices=indices, logits_slice=slice(first, T - 1)).logits
    pred = logits.argmax(-1)  # [n, T - 1 - first]
    exact, correct, total = [], [], []
    for i, (s, a0) in enumerate(zip(seqs, starts)):
        answer = torch.tensor(s[a0:], device=pred.device)
        hit = pred[i, a0 - 1 - first: len(s) - 1 - first] == answer
        exact.append(bool(hit.all()))
        correct.append(int(hit.sum()))
        total.append(len(answer))
    return exact, correct, total


def retrieval_accuracy(model, tokenizer, context_len: int, n: int, mode: str, label: str = "model",
                       task: str = "kv_retrieval", task_kwargs: dict | None = None, seed: int = 0,
                       batch_size: int = 4) -> RetrievalResult:
    """Accuracy of `model` on n eval rows of `task` at `context_len` (split "eval", never trained on)."""
    if mode not in ("dense", "sparse", "random"):
        raise ValueError(f"mode must be dense, sparse or random, got {mode!r}")
    rows = make_rows(task, n, seed, split=f"eval{context_len}", context_len=context_len, **(task_kwargs or {}))
    seqs, starts = encode_rows(tokenizer, rows)
    exact, correct, total = [], [], []
    for b0 in range(0, n, batch_size):
        e, c, t = score_batch(model, seqs[b0:b0 + batch_size], starts[b0:b0 + batch_size], mode,
                              tokenizer.pad_id, seed=seed * 1000 + b0)
        exact += e
        correct += c
        total += t
    return RetrievalResult(label, mode, context_len, None if mode == "dense" else model.config.index_topk, n,
                           sum(exact) / max(1, n), sum(correct) / max(1, sum(total)))


def accuracy_table(results: list[RetrievalResult]) -> str:
    """Markdown: one row per (label, mode, k), one column per context length."""
    lengths = sorted({r.context_len for r in results})
    rows: dict[tuple, dict[int, RetrievalResult]] = {}
    for r in results:
        rows.setdefault((r.label, r.mode, r.index_topk), {})[r.context_len] = r
    head = "| model | mode | k | " + " | ".join(f"acc@{L}" for L in lengths) + " |"
    lines = [head, "|" + "---|" * (3 + len(lengths))]
    for (label, mode, k), by_len in rows.items():
        cells = [f"{by_len[L].accuracy:.3f}" if L in by_len else "-" for L in lengths]
        lines.append(f"| {label} | {mode} | {k if k is not None else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
