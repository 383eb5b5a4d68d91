"""Reward functions by name: the built-in table, plus `module:attr` and `file.py:attr` paths for user code.

How a user plugs in a reward without touching dsarl: write

    # my_pkg/rewards.py  (or any file: name it as "path/to/rewards.py:brevity")
    def brevity(sample, limit=200):           # per sample: float, dict of sub-scores, or None (no score)
        return 1.0 if sample.num_tokens <= limit else 0.0

    class Judge:                              # stateful: constructed once per reward process with kwargs
        failure_value = -1.0                  # optional: what a failed call scores (default 0.0)
        def __init__(self, model_path): ...
        def __call__(self, sample): return {"score": ..., "style": ...}

    def pass_at_group(samples):               # group-level (config: group: true)
        ...

    async def remote_check(sample): ...       # async: awaited, several samples at once

    def format_reward_func(prompts, completions, **kwargs): ...      # TRL's reward_funcs signature
    def compute_score(data_source, solution_str, ground_truth, extra_info=None): ...  # verl's

and name them in config: `{name: "my_pkg.rewards:brevity", kwargs: {limit: 100}}`. `module:attr`
imports by module name (the working directory is tried too); `path/to/file.py:attr` loads the file
(relative to the working directory, or absolute). TRL- and verl-style functions are recognised by
their parameter names or forced with `style:` (see dsarl.rewards.adapters).
Resolution rule (the same for built-ins): a class is constructed with `kwargs` and the instance is
the reward; any other callable gets `kwargs` on every call. Kwargs are checked against the
signature when the config is validated (`validate_reward_config`), so a typo fails before any
worker starts, naming the component and the argument.
"""
from __future__ import annotations

import functools
import inspect
import math
from types import MappingProxyType
from typing import Callable, Mapping

from dsarl.rewards import code, language, length, rubric, rules
from dsarl.rewards.adapters import STYLES, BuiltReward, adapt, call_signature, detect_style
from dsarl.rewards.config import RewardComponentConfig, RewardConfig
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


def resolve_reward(name: str) -> object:
    """A built-in name, `module:attr` or `file.py:attr` -> the class or callable (nothing is built)."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" in name:
        obj = import_attr(name)
    else:
        raise ValueError(f"reward name {name!r} is neither a built-in ({sorted(BUILTIN_REWARDS)}) "
                         f"nor a 'module:function' or 'file.py:function' path")
    if not callable(obj):
        raise ValueError(f"reward {name!r} resolved to {type(obj).__name__}, which is not callable")
    return obj


def style_of(comp: RewardComponentConfig, obj: object) -> str:
    return detect_style(obj) if comp.style == "auto" else comp.style


def check_kwargs(comp: RewardComponentConfig, obj: object, style: str) -> None:
    """Bind the component's kwargs to the signature they go to; ValueError naming the component."""
    try:
        sig = inspect.signature(obj) if inspect.isclass(obj) else call_signature(obj)
    except (TypeError, ValueError):  # no readable signature: the first call will tell
        return
    try:
        if inspect.isclass(obj):
            sig.bind(**comp.kwargs)
        elif style == "sample":  # fn(sample_or_samples, **kwargs): every required argument is given
            sig.bind(None, **comp.kwargs)
        else:  # trl / verl: the other arguments come from the samples
            sig.bind_partial(**comp.kwargs)
    except TypeError as e:
        raise ValueError(f"reward component {comp.key!r} ({comp.name}): kwargs {sorted(comp.kwargs)} do not fit "
                         f"its signature {sig}: {e}") from None


def failure_value_of(comp: RewardComponentConfig, obj: object) -> float:
    """The config's failure_value, else the reward's own `failure_value` attribute, else 0.0."""
    if comp.failure_value is not None:
        return float(comp.failure_value)
    return float(getattr(obj, "failure_value", 0.0))


def validate_component(comp: RewardComponentConfig) -> object:
    """Resolve one component and check its style and kwargs without building it; -> the resolved object."""
    if comp.style != "auto" and comp.style not in STYLES:
        raise ValueError(f"reward component {comp.key!r}: style={comp.style!r}; expected auto or one of {STYLES}")
    if comp.failure_value is not None and not math.isfinite(comp.failure_value):
        raise ValueError(f"reward component {comp.key!r}: failure_value must be finite, got {comp.failure_value}")
    try:
        obj = resolve_reward(comp.name)
    except ValueError as e:
        raise ValueError(f"reward component {comp.key!r}: {e}") from None
    style = style_of(comp, obj)
    if style == "verl" and comp.group:
        raise ValueError(f"reward component {comp.key!r}: a verl-style reward scores one sample; "
                         f"it cannot be a group reward (group: true)")
    check_kwargs(comp, obj, style)
    return obj


def validate_reward_config(cfg: RewardConfig) -> None:
    """Everything about `cfg` that can be checked without starting a process or building a reward:
    names resolve (imports run), kwargs bind, labels are unique, limits are sane. ValueError naming
    the component (or field) otherwise."""
    if not cfg.components:
        raise ValueError("RewardConfig.components is empty: configure at least one reward")
    if not cfg.timeout_s > 0:
        raise ValueError(f"RewardConfig.timeout_s must be > 0, got {cfg.timeout_s}")
    if not cfg.max_failure_rate > 0:
        raise ValueError(f"RewardConfig.max_failure_rate must be > 0, got {cfg.max_failure_rate}")
    if cfg.failure_window < 1:
        raise ValueError(f"RewardConfig.failure_window must be >= 1, got {cfg.failure_window}")
    keys = [c.key for c in cfg.components]
    if len(set(keys)) != len(keys) or "total" in keys:
        raise ValueError(f"reward component names must be unique and not 'total', got {keys} "
                         f"(set `label` to use one function twice)")
    for comp in cfg.components:
        validate_component(comp)


def build_component(comp: RewardComponentConfig) -> BuiltReward:
    """Resolve, check and build one component (a class is constructed here) into a callable."""
    obj = validate_component(comp)
    style = style_of(comp, obj)
    if inspect.isclass(obj):
        return adapt(obj(**comp.kwargs), style, comp.group, {})
    return adapt(obj, style, comp.group, comp.kwargs)


def build_reward_fn(name: str, kwargs: dict | None = None) -> Callable:
    """A per-sample reward by name with `kwargs` bound: `fn(sample)` (used by rewards built on others)."""
    kwargs = dict(kwargs or {})
    obj = resolve_reward(name)
    if inspect.isclass(obj):
        return obj(**kwargs)
    return functools.partial(obj, **kwargs) if kwargs else obj
