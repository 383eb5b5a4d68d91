"""Text and chat datasets as training token ids: documents for pretraining, (prompt, reply) pairs for SFT.

One rule for both, so a file serves either stage: a row's `key` column is a string (a document: bos + text +
eos) or a chat, a list of {role, content} messages rendered by the tokenizer's chat template without a
generation prompt (the template writes bos and each turn's end itself).

- Pretraining packs documents end to end into [B, seq_len + 1] batches, each drawn from (seed, step) alone,
  so a resumed run sees exactly the batches it would have (as data/datasets.py packed_lm_batch does for the
  synthetic tasks).
- SFT splits a chat at its final assistant message: the prompt is the chat before it with the generation
  prompt, the reply is the rest of the whole chat's ids (the reply and its end-of-turn tokens). A text row is
  a prompt/answer pair from `prompt_key` / `answer_key` (data/prompts.py) instead: bos + prompt, answer + eos.
"""
import random

import torch

from .prompts import check_messages, prompt_row, split_reference


def document_ids(tokenizer, value, where: str = "document") -> list[int]:
    """A document's ids: bos + text + eos for a string, the chat template's for a list of messages."""
    if isinstance(value, str):
        eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        return tokenizer.encode(value, add_bos=True) + eos
    return tokenizer.apply_chat_template(check_messages(value, where), add_generation_prompt=False)


def load_documents(tokenizer, rows: list[dict], key: str, source: str = "data") -> list[list[int]]:
    docs = []
    for i, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"{source}: row {i} has no {key!r} column (columns: {sorted(row)})")
        docs.append(document_ids(tokenizer, row[key], f"{source}: row {i}[{key!r}]"))
    if not docs:
        raise ValueError(f"{source}: no rows")
    return docs


def packed_document_batch(docs: list[list[int]], batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] ids: documents drawn at random (with replacement, by (seed, step)) packed end to
    end; the last one in a row is cut."""
    rng = random.Random(f"{seed}/pretrain-data/{step}")
    out = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
    for b in range(batch_size):
        ids: list[int] = []
        while len(ids) < seq_len + 1:
            ids += docs[rng.randrange(len(docs))]
        out[b] = torch.tensor(ids[: seq_len + 1])
    return out


def sft_example(tokenizer, row: dict, key: str, answer_key: str | None = None,
                where: str = "row") -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of one row; see the module docstring."""
    value = row.get(key)
    if isinstance(value, str) or value is None:
        r = prompt_row(row, key, answer_key, where)
        if "answer" not in r:
            raise ValueError(f"{where}: a text prompt needs an answer column for SFT (answer_key)")
        eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        return tokenizer.encode(r["prompt"], add_bos=True), tokenizer.encode(str(r["answer"])) + eos
    messages = check_messages(value, f"{where}[{key!r}]")
    prompt, reply = split_reference(messages)
    if reply is None:
        raise ValueError(f"{where}[{key!r}]: the chat does not end with an assistant message to train on")
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
        raise ValueError(f"{where}: the chat template renders the chat without its last reply differently from the "
                         f"start of the whole chat, so the reply's tokens cannot be cut out")
    return prompt_ids, full[len(prompt_ids):]


def sft_pairs(tokenizer, rows: list[dict], key: str, answer_key: str | None = None,
              source: str = "data") -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, replies) of every row: learner/distill.py's Sequences(prompts, completions)."""
    pairs = [sft_example(tokenizer, r, key, answer_key, f"{source}: row {i}") for i, r in enumerate(rows)]
    return [p for p, _ in pairs], [c for _, c in pairs]
