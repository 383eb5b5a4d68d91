"""Retrieval documents with many queries, and packed LM batches that carry a mask of answer tokens.

A single-query `kv_retrieval` document (data/tasks.py) of ~2k bytes holds two answer bytes: almost no
training signal for retrieval. A multi-query document states the key:value context once and then asks
`n_queries` keys, each answered in place, so one sequence carries dozens of answer tokens:

    abc:12 xyz:07 ... qrs:55\n?xyz:07\n?abc:12\n ...

The first query reads exactly like a `kv_retrieval` eval prompt (`context\\n?key:` -> value).

Documents are lists of (text, is_answer) segments; `packed_lm_batch_with_mask` packs them like
`data.datasets.packed_lm_batch` (bos + text + eos, end to end) and returns, beside the ids, which
tokens are answers, so pretraining can weight the loss towards them (learner/pretrain.py).
Any task of data/tasks.py is a document too: prompt (not answer), answer, newline.
"""
import random

import torch

from .tasks import TASKS, get_task, passkey_haystack, random_kv_pairs


def kv_multi_query(rng: random.Random, context_len: int = 512, key_len: int = 3, value_len: int = 2,
                   n_queries: int = 32, min_context_len: int | None = None) -> list[tuple[str, bool]]:
    """Segments of one document: ~context_len bytes of unique `key:value` pairs (context_len drawn
    uniformly from [min_context_len, context_len] when that is set), then n_queries `?key:value` lines,
    keys drawn without replacement while they last (then with)."""
    if min_context_len is not None:
        context_len = rng.randint(min_context_len, context_len)
    n_pairs = max(2, context_len // (key_len + value_len + 2))  # "kkk:vv "
    keys_list, values = random_kv_pairs(rng, n_pairs, key_len, value_len)
    order = rng.sample(range(n_pairs), min(n_queries, n_pairs))
    order += [rng.randrange(n_pairs) for _ in range(n_queries - len(order))]
    segments = [(" ".join(f"{k}:{v}" for k, v in zip(keys_list, values)), False)]
    for i in order:
        segments += [(f"\n?{keys_list[i]}:", False), (values[i], True)]
    segments.append(("\n", False))
    return segments


def passkey_multi_query(rng: random.Random, context_len: int = 512, n_needles: int = 8, value_len: int = 2,
                        min_context_len: int | None = None, filler: str = "random",
                        min_queries: int | None = None) -> list[tuple[str, bool]]:
    """A passkey haystack (data/tasks.py passkey_haystack) of ~context_len bytes (drawn from
    [min_context_len, context_len] when that is set), then every needle asked once, in random order:
    `\n?K` -> vv. The first query reads exactly like a `passkey` eval prompt.

    `min_queries`: ask a random number of the needles, from min_queries to all. With every needle
    asked, the document never ends after its first answer, and a model trained on it (with eos) never
    stops after answering a single passkey prompt: a GRPO specialist then finds no exact answer to
    reward (measured: it learnt `7\n?` + eos). A random count leaves some chance of an end after any answer."""
    if min_context_len is not None:
        context_len = rng.randint(min_context_len, context_len)
    text, keys, values = passkey_haystack(rng, context_len, n_needles, value_len, filler)
    n_queries = n_needles if min_queries is None else rng.randint(max(1, min(min_queries, n_needles)), n_needles)
    segments = [(text, False)]
    for i in rng.sample(range(n_needles), n_queries):
        segments += [(f"\n?{keys[i]}", False), (values[i], True)]
    segments.append(("\n", False))
    return segments


def repeat_copy(rng: random.Random, length: int = 128, min_length: int | None = None) -> list[tuple[str, bool]]:
    """Random lowercase words (~length bytes), a newline, the same words again (the answer). Predicting
    the copy needs an induction head (find the current token earlier, read what followed it): the
    circuit retrieval needs, formed quickly here because every copied token trains it."""
    if min_length is not None:
        length = rng.randint(min_length, length)
    text, _, _ = passkey_haystack(rng, length, 0, 0)
    return [(text, False), ("\n", False), (text, True), ("\n", False)]


def mixture(rng: random.Random, parts: dict[str, dict] | None = None) -> list[tuple[str, bool]]:
    """One document of a part drawn by weight: parts = {name: {weight, kwargs, document}}; `document`
    (a document or task name) defaults to the part's name, so two parts can share a generator."""
    if not parts:
        raise ValueError("mixture: `parts` must name at least one document, e.g. {repeat_copy: {weight: 1}}")
    names = sorted(parts)
    name = rng.choices(names, weights=[float(parts[n].get("weight", 1.0)) for n in names])[0]
    document = parts[name].get("document", name)
    if document == "mixture":
        raise ValueError("mixture: a part cannot be another mixture")
    return document_segments(document, rng, dict(parts[name].get("kwargs") or {}))


DOCUMENTS = {"kv_multi_query": kv_multi_query, "passkey_multi_query": passkey_multi_query,
             "repeat_copy": repeat_copy, "mixture": mixture}


def document_segments(task: str, rng: random.Random, task_kwargs: dict) -> list[tuple[str, bool]]:
    """One document of `task`: a multi-query generator above, or a row of data/tasks.py."""
    if task in DOCUMENTS:
        return DOCUMENTS[task](rng, **task_kwargs)
    try:
        gen = get_task(task)
    except ValueError:
        raise ValueError(f"unknown task {task!r}; documents: {sorted(DOCUMENTS)}, tasks: {sorted(TASKS)}") from None
    row = gen(rng, **task_kwargs)
    return [(row["prompt"], False), (row["answer"], True), ("\n", False)]  # as data.datasets.lm_document


def encode_document(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """bos + segments + eos -> (ids, is_answer per id)."""
    ids, mask = [tokenizer.bos_id], [False]
    for text, is_answer in segments:
        t = tokenizer.encode(text)
        ids += t
        mask += [is_answer] * len(t)
    return ids + [tokenizer.eos_id], mask + [False]


def packed_lm_batch_with_mask(tokenizer, task: str, task_kwargs: dict, batch_size: int, seq_len: int, seed: int,
                              step: int, pack: bool = True, eos_prob: float = 1.0
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (ids [batch_size, seq_len + 1] long, is_answer, is_pad [batch_size, seq_len + 1] bool).

    Same packing, eos_prob and (seed, step) seeding as data.datasets.packed_lm_batch: for a task of
    data/tasks.py the ids are identical to it. `pack=False` puts one document per row from position 0,
    cut at seq_len + 1 or right-padded with pad tokens (is_pad): packed rows let a query see the
    documents before its own, and retrieval documents reuse their keys (26 passkey letters), so
    there a query can find a same-named needle of an earlier document."""
    rng = random.Random(f"{seed}/pretrain/{step}")
    ids_out = torch.full((batch_size, seq_len + 1), tokenizer.pad_id, dtype=torch.long)
    mask_out = torch.zeros(batch_size, seq_len + 1, dtype=torch.bool)
    pad_out = torch.ones(batch_size, seq_len + 1, dtype=torch.bool)
    for b in range(batch_size):
        ids: list[int] = []
        mask: list[bool] = []
        while len(ids) < seq_len + 1:
            i, m = encode_document(tokenizer, document_segments(task, rng, task_kwargs))
            if not (eos_prob >= 1.0 or rng.random() < eos_prob):  # no eos: the next document follows
                i, m = i[:-1], m[:-1]
            ids += i
            mask += m
            if not pack:
                break
        n = min(len(ids), seq_len + 1)
        ids_out[b, :n] = torch.tensor(ids[:n])
        mask_out[b, :n] = torch.tensor(mask[:n])
        pad_out[b, :n] = False
    return ids_out, mask_out, pad_out


def loss_weights(is_answer: torch.Tensor, non_answer_weight: float, is_pad: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss weights: 1 on answer tokens, non_answer_weight elsewhere, 0 on padding (fp32)."""
    w = torch.where(is_answer, 1.0, float(non_answer_weight)).float()
    return w if is_pad is None else w.masked_fill(is_pad, 0.0)


def lm_batch(tokenizer, task: str, task_kwargs: dict, non_answer_weight: float, batch_size: int, seq_len: int,
             seed: int, step: int, pack: bool = True, eos_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (ids [B, seq_len + 1], loss weights of the targets ids[:, 1:] [B, seq_len] or None).

    None (plain LM loss, ids from data.datasets.packed_lm_batch, unchanged) for a packed task of
    data/tasks.py with non_answer_weight 1; otherwise the masked packing and its weights (0 on padding:
    the target of the last real token is its document's eos, then padding carries no loss)."""
    if task not in DOCUMENTS and non_answer_weight == 1.0 and pack:
        from .datasets import packed_lm_batch

        return packed_lm_batch(tokenizer, task, task_kwargs, batch_size, seq_len, seed, step, eos_prob), None
    ids, is_answer, is_pad = packed_lm_batch_with_mask(tokenizer, task, task_kwargs, batch_size, seq_len, seed, step,
                                                       pack, eos_prob)
    return ids, loss_weights(is_answer[:, 1:], non_answer_weight, is_pad[:, 1:])
