"""Rubric scoring: weighted criteria from YAML, each checked deterministically or by an LLM judge.

A rubric file (`configs/rubrics/<id>.yaml`):

    id: concise_math                  # optional; defaults to the file name
    description: free text            # optional
    criteria:
      - name: boxed                   # unique inside the rubric
        weight: 1.0                   # > 0
        check: regex                  # regex | contains | python | judge
        pattern: '\\boxed\\{.+\\}'
      - {name: polite, weight: 0.5, check: contains, text: [thanks, please], case_sensitive: false}
      - {name: short, weight: 0.5, check: python, predicate: "my_pkg.checks:is_short"}
      - {name: sound, weight: 2.0, check: judge, question: "Is every step of the reasoning valid?"}

Checkers: `regex` (1 if `pattern` is found), `contains` (1 if any of `text` occurs), `python` (a
`module:function` `(sample) -> bool | float` in [0, 1]), `judge` (the judge's P("yes") for the
question about this prompt and completion). Score = sum(w_i * s_i) / sum(w_i).
Unknown keys, missing keys and wrong types fail at load with the file and the key named.

Per-prompt rubrics come from the task metadata: `row[rubric_key]` is a rubric id (a file in
`rubric_dir`) or an inline rubric dict of the same shape.

Plugging in a judge: any object with `yes_probability(prompts: list[str]) -> list[float]` (the
`JudgeEngine` protocol). Pass it directly (`RubricReward(judge=engine)`), or from config as a
`module:factory` path that builds it once per reward worker:
`{name: rubric, kwargs: {judge: "my_pkg.judges:make_engine", judge_kwargs: {model: ...}}}`.
The factory may return an adapter that forwards to a rollout engine running elsewhere (for
example a Ray actor looked up by name); it is asked once per sample with all judge criteria.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Union

import yaml

from dsarl.rewards.imports import import_attr
from dsarl.rewards.types import RewardSample

CHECKS = ("regex", "contains", "python", "judge")
# check -> (required keys, optional keys with their types)
_CHECK_KEYS = {
    "regex": ({"pattern": str}, {"ignore_case": bool}),
    "contains": ({"text": (str, list)}, {"case_sensitive": bool}),
    "python": ({"predicate": str}, {}),
    "judge": ({"question": str}, {}),
}
_COMMON_KEYS = {"name": str, "weight": (int, float), "check": str}

JUDGE_TEMPLATE = (
    "You are grading a response against one criterion.\n\n"
    "[Prompt]\n{prompt}\n\n[Response]\n{completion}\n\n[Criterion]\n{question}\n\n"
    "Does the response meet the criterion? Answer yes or no.\nAnswer:"
)


class JudgeEngine(Protocol):
    """What the rubric needs from a judge model: P("yes") for each prompt, in order, in [0, 1]."""

    def yes_probability(self, prompts: list[str]) -> list[float]: ...


class RubricError(ValueError):
    """A rubric that does not follow the schema; the message names the source and the key."""


@dataclass(frozen=True)
class Criterion:
    name: str
    weight: float
    check: str  # one of CHECKS
    params: dict  # the check's own keys (pattern, text, predicate, question, ...)


@dataclass(frozen=True)
class Rubric:
    id: str
    criteria: tuple  # of Criterion
    description: str = ""


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def _check_type(value, expected, where: str) -> None:
    if isinstance(value, bool) and expected in ((int, float), int, float):
        raise RubricError(f"{where}: expected a number, got {value!r}")
    if not isinstance(value, expected):
        raise RubricError(f"{where}: expected {_type_name(expected)}, got {type(value).__name__} {value!r}")


def _parse_criterion(raw, where: str) -> Criterion:
    if not isinstance(raw, dict):
        raise RubricError(f"{where}: expected a mapping, got {type(raw).__name__}")
    check = raw.get("check")
    if check not in CHECKS:
        raise RubricError(f"{where}.check: expected one of {list(CHECKS)}, got {check!r}")
    required, optional = _CHECK_KEYS[check]
    allowed = {**_COMMON_KEYS, **required, **optional}
    for key in raw:
        if key not in allowed:
            raise RubricError(f"{where}.{key}: unknown key for check={check!r} (allowed: {sorted(allowed)})")
    for key in ("name", *required):
        if key not in raw:
            raise RubricError(f"{where}.{key}: missing required key")
    for key, value in raw.items():
        _check_type(value, allowed[key], f"{where}.{key}")
    weight = float(raw.get("weight", 1.0))
    if not (weight > 0 and math.isfinite(weight)):
        raise RubricError(f"{where}.weight: must be a finite number > 0, got {weight!r}")
    params = {k: v for k, v in raw.items() if k not in _COMMON_KEYS}
    if check == "regex":
        try:
            re.compile(params["pattern"])
        except re.error as e:
            raise RubricError(f"{where}.pattern: invalid regular expression: {e}") from e
    if check == "contains":
        texts = params["text"] if isinstance(params["text"], list) else [params["text"]]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RubricError(f"{where}.text: expected a string or a non-empty list of strings")
        params["text"] = texts
    return Criterion(raw["name"], weight, check, params)


def parse_rubric(raw, source: str, default_id: str = "") -> Rubric:
    """Validate a rubric mapping; `source` (a file path or "row[...]") prefixes every error."""
    if not isinstance(raw, dict):
        raise RubricError(f"{source}: a rubric is a mapping with a 'criteria' list, got {type(raw).__name__}")
    for key in raw:
        if key not in ("id", "description", "criteria"):
            raise RubricError(f"{source}: {key}: unknown key (allowed: id, description, criteria)")
    criteria = raw.get("criteria")
    if not isinstance(criteria, list) or not criteria:
        raise RubricError(f"{source}: criteria: expected a non-empty list, got {criteria!r}")
    parsed = tuple(_parse_criterion(c, f"{source}: criteria[{i}]") for i, c in enumerate(criteria))
    names = [c.name for c in parsed]
    if len(set(names)) != len(names):
        raise RubricError(f"{source}: criteria: duplicate criterion names {names}")
    rubric_id = raw.get("id", default_id)
    _check_type(rubric_id, str, f"{source}: id")
    description = raw.get("description", "")
    _check_type(description, str, f"{source}: description")
    return Rubric(rubric_id, parsed, description)


def load_rubric(path: Union[str, Path]) -> Rubric:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RubricError(f"{path}: not valid YAML: {e}") from e
    return parse_rubric(raw, str(path), default_id=path.stem)


def default_rubric_dir() -> Path:
    import dsarl.configs

    return Path(dsarl.configs.__file__).parent / "rubrics"


def check_criterion(criterion: Criterion, sample: RewardSample) -> float:
    """Score of one deterministic criterion in [0, 1]."""
    p, text = criterion.params, sample.completion
    if criterion.check == "regex":
        return float(re.search(p["pattern"], text, re.IGNORECASE if p.get("ignore_case") else 0) is not None)
    if criterion.check == "contains":
        if p.get("case_sensitive", False):
            return float(any(t in text for t in p["text"]))
        return float(any(t.lower() in text.lower() for t in p["text"]))
    if criterion.check == "python":
        value = float(import_attr(p["predicate"])(sample))
        assert 0.0 <= value <= 1.0, f"predicate {p['predicate']} returned {value}, outside [0, 1]"
        return value
    raise ValueError(f"criterion {criterion.name!r}: check={criterion.check!r} is not deterministic")


def score_rubric(rubric: Rubric, sample: RewardSample, judge: Optional[JudgeEngine]) -> dict:
    """{"score": weighted mean, "<criterion name>": its score, ...} for one sample."""
    scores = {c.name: check_criterion(c, sample) for c in rubric.criteria if c.check != "judge"}
    judged = [c for c in rubric.criteria if c.check == "judge"]
    if judged:
        if judge is None:
            raise ValueError(f"rubric {rubric.id!r} has judge criteria but no judge engine was given")
        prompts = [JUDGE_TEMPLATE.format(prompt=sample.prompt, completion=sample.completion,
                                         question=c.params["question"]) for c in judged]
        probs = judge.yes_probability(prompts)
        assert len(probs) == len(prompts), f"judge returned {len(probs)} probabilities for {len(prompts)} prompts"
        for c, p in zip(judged, probs):
            assert 0.0 <= p <= 1.0, f"judge P(yes)={p} for criterion {c.name!r} is outside [0, 1]"
            scores[c.name] = float(p)
    total_weight = sum(c.weight for c in rubric.criteria)
    return {"score": sum(c.weight * scores[c.name] for c in rubric.criteria) / total_weight, **scores}


class RubricReward:
    """Reward: the sample's rubric (row[rubric_key] id or inline, else `rubric`) scored on the sample."""

    def __init__(self, rubric: Optional[str] = None, rubric_key: str = "rubric",
                 rubric_dir: Optional[str] = None, judge: Union[None, str, JudgeEngine] = None,
                 judge_kwargs: Optional[dict] = None):
        self.default, self.rubric_key = rubric, rubric_key
        self.rubric_dir = Path(rubric_dir) if rubric_dir else default_rubric_dir()
        if isinstance(judge, str):
            judge = import_attr(judge)(**(judge_kwargs or {}))
        self.judge = judge
        self._load = functools.lru_cache(maxsize=256)(self._load_by_id)

    def _load_by_id(self, rubric_id: str) -> Rubric:
        path = self.rubric_dir / f"{rubric_id}.yaml"
        if not path.is_file():
            raise RubricError(f"rubric id {rubric_id!r}: no file {path}")
        return load_rubric(path)

    def rubric_for(self, sample: RewardSample) -> Rubric:
        spec = sample.row.get(self.rubric_key) or self.default
        if isinstance(spec, dict):
            return parse_rubric(spec, f"row[{self.rubric_key!r}]")
        if not isinstance(spec, str) or not spec:
            raise RubricError(f"rubric: row has no {self.rubric_key!r} and no default `rubric` kwarg")
        return self._load(spec)

    def __call__(self, sample: RewardSample) -> dict:
        return score_rubric(self.rubric_for(sample), sample, self.judge)
