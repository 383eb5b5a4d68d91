"""Reward functions as users write them for other trainers, called on dsarl's samples.

Styles (a component's `style`, or read from the signature when "auto"):

- "sample" (dsarl's own): `fn(sample, **kwargs) -> float | dict | None`, once per sample
  (`group: true`: `fn(samples, **kwargs) -> list`, once per group).
- "trl" (TRL GRPOTrainer's `reward_funcs`): `fn(prompts, completions, **kwargs) -> list[float | None]`,
  called once per chunk of samples a worker scores (once per group with `group: true`), with
  keyword lists: `prompts`, `completions`, every other column of the dataset rows (missing
  cells are None), `completions_ids` when the samples carry token ids, and `trainer_state=None`.
  Prompts and completions are plain strings (TRL's "standard" format), except when the rows'
  `prompt` column holds chat messages: then `prompts` are those message lists and each completion
  is `[{"role": "assistant", "content": text}]` (TRL's "conversational" format). A function without
  `**kwargs` gets only the arguments it names.
- "verl" (verl's `custom_reward_function`): `fn(data_source, solution_str, ground_truth,
  extra_info=None, **kwargs) -> float | dict`, once per sample, by keyword: `data_source` and
  `extra_info` from the row's columns, `ground_truth` from `row["reward_model"]["ground_truth"]`
  (verl's parquet layout), else `row["ground_truth"]`, else `row["answer"]`. A dict return keeps
  "score" and its numeric entries (verl logs strings such as the extracted prediction too).

"auto": a parameter named `solution_str` -> verl; one named `prompts`, `completions` or
`completions_ids` -> trl; else sample. For a class, the signature read is its `__call__`'s.
Any style may be `async def`; the combiner awaits it (see dsarl.rewards.child).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from dsarl.rewards.types import RewardSample

STYLES = ("sample", "trl", "verl")
_TRL_NAMES = ("prompts", "completions", "completions_ids")


def call_signature(obj) -> inspect.Signature:
    """The signature a reward is called with: a class's `__call__` (without self), else the callable's."""
    target = obj.__call__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    if inspect.isclass(obj):  # unbound __call__: drop self
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def detect_style(obj) -> str:
    try:
        names = set(call_signature(obj).parameters)
    except (TypeError, ValueError):  # no readable signature (some C callables): dsarl's own style
        return "sample"
    if "solution_str" in names:
        return "verl"
    if names & set(_TRL_NAMES):
        return "trl"
    return "sample"


def is_async(obj) -> bool:
    target = obj.__call__ if inspect.isclass(obj) or not inspect.isroutine(obj) else obj
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(obj)


def _accepts_any_kwarg(fn) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True


def _keep_named(fn, kwargs: dict) -> dict:
    """kwargs as they are when fn takes **kwargs, else only those it names."""
    if _accepts_any_kwarg(fn):
        return kwargs
    names = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def _is_chat(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "content" in m for m in prompt)


def trl_arguments(samples: list[RewardSample]) -> dict:
    """The keyword lists TRL's GRPOTrainer passes a reward function, for these samples."""
    rows = [s.row for s in samples]
    if rows and all(_is_chat(r.get("prompt")) for r in rows):
        args = {"prompts": [r["prompt"] for r in rows],
                "completions": [[{"role": "assistant", "content": s.completion}] for s in samples]}
    else:
        args = {"prompts": [s.prompt for s in samples], "completions": [s.completion for s in samples]}
    columns = dict.fromkeys(k for r in rows for k in r if k != "prompt")
    for k in columns:
        if k not in args:
            args[k] = [r.get(k) for r in rows]
    if samples and all(s.completion_ids is not None for s in samples):
        args["completions_ids"] = [list(s.completion_ids) for s in samples]
    args["trainer_state"] = None
    return args


def verl_ground_truth(row: dict):
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and "ground_truth" in reward_model:
        return reward_model["ground_truth"]
    for key in ("ground_truth", "answer"):
        if key in row:
            return row[key]
    raise KeyError(f"verl-style reward: the row has no reward_model.ground_truth, ground_truth or answer "
                   f"column (columns: {sorted(row)})")


def _numeric_entries(out):
    if not isinstance(out, dict):
        return out
    kept = {k: v for k, v in out.items() if k == "score" or not isinstance(v, (str, bytes, list, tuple, dict))}
    return kept


def item_size(item) -> int:
    """Samples in one call's argument: a list of them, or one sample."""
    return len(item) if isinstance(item, list) else 1


@dataclass(frozen=True)
class BuiltReward:
    """A reward ready to call: `call(item)`, where an item is one RewardSample (unit "sample") or the
    list of samples of one group ("group") or of the whole chunk a worker scores ("chunk"); a list
    call returns one result per sample. The return may be awaitable when `is_async`."""

    call: Callable
    unit: str  # "sample" | "group" | "chunk"
    is_async: bool


def adapt(fn: Callable, style: str, group: bool, kwargs: dict) -> BuiltReward:
    """fn (a function, or an instance already built with its kwargs) called in `style`; `kwargs`
    are added to every call."""
    asynchronous = is_async(fn)
    if style == "sample":
        call = (lambda item: fn(item, **kwargs)) if kwargs else fn
        return BuiltReward(call, "group" if group else "sample", asynchronous)
    if style == "trl":
        def call_trl(samples):
            return fn(**_keep_named(fn, {**trl_arguments(samples), **kwargs}))
        return BuiltReward(call_trl, "group" if group else "chunk", asynchronous)
    if style == "verl":
        if group:
            raise ValueError("a verl-style reward scores one sample; it cannot be a group reward (group: true)")

        def call_verl(sample):
            args = {"data_source": sample.row.get("data_source"), "solution_str": sample.completion,
                    "ground_truth": verl_ground_truth(sample.row), "extra_info": sample.row.get("extra_info")}
            out = fn(**_keep_named(fn, {**args, **kwargs}))
            if inspect.isawaitable(out):
                return _await_then(out, _numeric_entries)
            return _numeric_entries(out)
        return BuiltReward(call_verl, "sample", asynchronous)
    raise ValueError(f"reward style {style!r}; expected one of {STYLES}")


async def _await_then(awaitable, then):
    return then(await awaitable)
