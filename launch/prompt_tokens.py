"""Prompts as the policy sees them: token ids, and whether they fit the model's context.

    ids = prompt_ids_for(rows, tokenizer, "raw")                       # what the driver generates from
    limit = prompt_token_limit(init, model_overrides, max_new_tokens)  # max_position_embeddings - max_new_tokens
    rows, dropped = fit_to_context(rows, ids, limit, "error", "data/train.jsonl")

A prompt with more than `limit` tokens cannot be generated from: the engine would run past the model's
positions mid-step (and again on `--resume`, which samples the same prompts). `data.overlong` says what
to do about one, found when the data is loaded (and by the pre-start checks, before Ray starts):

    error     (default) stop, naming the file, the row and the length
    skip      drop the row; counted (data/overlong_skipped)
    truncate  keep the row, generate from its last `limit` tokens (left truncation: the end of a prompt,
              where the question and a chat template's generation prompt are, is what the model answers;
              the start, bos and a system prompt included, is cut); counted (data/overlong_truncated)

Here, not in the driver, so the pre-start checks (launch/preflight.py) tokenize exactly as the driver
does without importing Ray.
"""
from pathlib import Path
from typing import Literal

from dsarl.models import apply_chat_template
from dsarl.models.config import DSAConfig

OverlongPolicy = Literal["error", "skip", "truncate"]


def prompt_ids_for(rows: list[dict], tokenizer, fmt: str, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each row's `prompt` (load_prompt_rows): a chat (or, with fmt "chat", a text as one user
    message) through the tokenizer's chat template with the generation prompt; else bos + the text. With
    max_tokens, a longer prompt keeps its last max_tokens tokens (data.overlong: truncate)."""
    out = []
    for r in rows:
        prompt = r["prompt"]
        if isinstance(prompt, str) and fmt != "chat":
            ids = tokenizer.encode(prompt, add_bos=True)
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
        out.append(ids[-max_tokens:] if max_tokens is not None and len(ids) > max_tokens else ids)
    return out


def prompt_token_limit(init: str | Path, model_overrides: dict, max_new_tokens: int) -> int:
    """The most prompt tokens a generation of max_new_tokens fits in: the checkpoint's (overridden)
    max_position_embeddings minus max_new_tokens. Raises ValueError when not even one prompt token fits."""
    positions = DSAConfig.from_file(Path(init) / "config.json").replace(**model_overrides).max_position_embeddings
    limit = positions - max_new_tokens
    if limit < 1:
        raise ValueError(f"rollout.max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"max_position_embeddings {positions} ({init})")
    return limit


def fit_to_context(rows: list[dict], ids: list[list[int]], limit: int, policy: OverlongPolicy,
                   source: str) -> tuple[list[dict], int]:
    """(the rows to use, how many were over `limit`) under `policy` (module docstring); ids[i] are
    rows[i]'s prompt tokens. Raises ValueError naming `source`, the first overlong row and its length."""
    over = [i for i, x in enumerate(ids) if len(x) > limit]
    if over and policy == "error":
        i = over[0]
        raise ValueError(f"{source}: row {i}: the prompt is {len(ids[i])} tokens, more than the {limit} that fit "
                         f"the model's context with rollout.max_new_tokens ({len(over)} row(s) too long); "
                         f"shorten them, or set data.overlong: skip | truncate")
    if policy == "skip":
        dropped = set(over)
        return [r for i, r in enumerate(rows) if i not in dropped], len(over)
    return rows, len(over)
