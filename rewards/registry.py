"""Reward functions by name: the built-in table, plus `module:attr` paths for user code.

How a user plugs in a reward without touching dsarl: write

    # my_pkg/rewards.py
    def brevity(sample, limit=200):          # per sample
        return 1.0 if sample.num_tokens <= limit else 0.0

    class Judge:                              # stateful: constructed once per worker with kwargs
        def __init__(self, model_path): ...
        def __call__(self, sample): return {"score": ..., "style": ...}

    def pass_at_group(samples):               # group-level (config: group: true)
        ...

and name them in config: `{name: "my_pkg.rewards:brevity", kwargs: {limit: 100}}`.
Resolution rule (the same for built-ins): a class is constructed with `kwargs` and the instance is
the reward; any other callable is called as `fn(sample, **kwargs)`.
"""
from __future__ import annotations

import functools
import inspect
from types import MappingProxyType
from typing import Callable, Mapping

from dsarl.rewards import code, language, length, rubric, rules
from dsarl.rewards.imports import import_attr

BUILTIN_REWARDS: Mapping[str, Callable] = MappingProxyType({
    "math_answer": rules.math_answer,  # row: answer
    "exact_match": rules.exact_match,  # row: answer
    "regex_match": rules.regex_match,  # kwargs: pattern
    "format_tags": rules.format_tags,  # kwargs: tags
    "json_schema": rules.json_schema,  # kwargs: schema, or row: schema
    "code_tests": code.CodeTests,  # row: tests (assert code or stdin/stdout cases)
    "rubric": rubric.RubricReward,  # row: rubric id or inline rubric
    "overlong": length.overlong_penalty,  # kwargs: max_len, buffer
    "length_shaping": length.LengthShaping,  # group-level
    "language": language.LanguageConsistency,  # row: language (or kwargs: target)
})


def build_reward_fn(name: str, kwargs: dict | None = None) -> Callable:
    """Resolve `name` and bind `kwargs` following the class / function rule above."""
    kwargs = dict(kwargs or {})
    if name in BUILTIN_REWARDS:
        obj = BUILTIN_REWARDS[name]
    elif ":" in name:
        obj = import_attr(name)
    else:
        raise ValueError(f"reward name {name!r} is neither a built-in ({sorted(BUILTIN_REWARDS)}) "
                         f"nor a 'module:function' path")
    if inspect.isclass(obj):
        return obj(**kwargs)
    if not callable(obj):
        raise ValueError(f"reward {name!r} resolved to {type(obj).__name__}, which is not callable")
    return functools.partial(obj, **kwargs) if kwargs else obj
