"""Rule-based rewards: math answers, exact and regex match, format checks (tags, JSON schema).

All return 1.0 (pass) or 0.0 (fail); a malformed completion scores 0.0, it never raises.
Math answers are compared by value: plain numbers (with units, %, fractions, thousands separators)
exactly when both are integers (1000001 is not 1000000) and with a relative tolerance when either
is not, anything else (LaTeX, symbolic) with `math-verify`.
"""
from __future__ import annotations

import json
import logging
import math
import re
from typing import Optional

import jsonschema

from dsarl.rewards.extract import final_answer, last_boxed, parse_exact
from dsarl.rewards.types import RewardSample

# math-verify warns on every call when its own signal-based timeout is disabled; we disable it
# because signals only work on the main thread, and the combiner enforces the time limit instead
# (by killing the reward process: math-verify can compute for ever inside sympy's C code).
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _reference(sample: RewardSample, answer_key: str) -> str:
    if answer_key not in sample.row:
        raise KeyError(f"answer_key={answer_key!r} is not a column of the row (columns: {sorted(sample.row)})")
    return str(sample.row[answer_key])


def math_equal(pred: str, gold: str, rel_tol: float = 1e-6) -> bool:
    """True when two final answers have the same value (numeric first, then math-verify). Two
    integers must be equal; otherwise numbers are equal within `rel_tol`."""
    p, g = parse_exact(pred), parse_exact(gold)
    if p is not None and g is not None:
        if p.denominator == 1 and g.denominator == 1:
            return p == g
        try:
            return p == g or math.isclose(float(p), float(g), rel_tol=rel_tol, abs_tol=1e-9)
        except OverflowError:  # one side beyond float range and they differ
            return False
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return True
    return _normalise(pred) == _normalise(gold)


def _normalise(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$.").lower()


def math_answer(sample: RewardSample, answer_key: str = "answer", rel_tol: float = 1e-6) -> float:
    """1.0 when the completion's final answer (last `\\boxed{}`, else last number) equals the
    reference `row[answer_key]` (itself reduced to its last `\\boxed{}` when it has one)."""
    pred = final_answer(sample.completion)
    if pred is None or not pred.strip():
        return 0.0
    gold = _reference(sample, answer_key)
    gold = last_boxed(gold) or gold
    return float(math_equal(pred, gold, rel_tol))


def exact_match(sample: RewardSample, answer_key: str = "answer", extract: bool = True,
                case_sensitive: bool = False) -> float:
    """1.0 when the (extracted, whitespace-collapsed) answer equals `row[answer_key]` as a string."""
    pred = final_answer(sample.completion) if extract else sample.completion
    if pred is None:
        return 0.0
    gold = _reference(sample, answer_key)
    a, b = " ".join(pred.split()), " ".join(gold.split())
    return float(a == b if case_sensitive else a.lower() == b.lower())


def regex_match(sample: RewardSample, pattern: str, answer_key: Optional[str] = None,
                fullmatch: bool = False, ignore_case: bool = False) -> float:
    """1.0 when `pattern` matches the completion. `{answer}` in the pattern is replaced by the escaped
    reference `row[answer_key]`, so one pattern serves every row: `r"Answer:\\s*{answer}\\s*$"`."""
    if answer_key is not None:
        pattern = pattern.replace("{answer}", re.escape(_reference(sample, answer_key)))
    flags = re.IGNORECASE if ignore_case else 0
    text = sample.completion.strip()
    found = re.fullmatch(pattern, text, flags) if fullmatch else re.search(pattern, text, flags)
    return float(found is not None)


def format_tags(sample: RewardSample, tags: tuple = ("think", "answer"), ordered: bool = True) -> float:
    """1.0 when every `<tag>...</tag>` appears exactly once (in the given order when `ordered`)."""
    text, positions = sample.completion, []
    for tag in tags:
        blocks = list(re.finditer(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL))
        opens = len(re.findall(rf"<{re.escape(tag)}>", text))
        if len(blocks) != 1 or opens != 1:
            return 0.0
        positions.append(blocks[0].start())
    return float(not ordered or positions == sorted(positions))


def extract_json(text: str) -> Optional[object]:
    """The JSON value in a ```json fence, else the whole text, else the outermost {...}; None if none."""
    candidates = [m.group(1) for m in re.finditer(r"```(?:json)?\s*\n(.*?)```", text, re.DOTALL)]
    candidates.append(text.strip())
    first, last = text.find("{"), text.rfind("}")
    if 0 <= first < last:
        candidates.append(text[first:last + 1])
    for c in candidates:
        try:
            return json.loads(c)
        except (ValueError, RecursionError):
            continue
    return None


def json_schema(sample: RewardSample, schema: Optional[dict] = None, schema_key: str = "schema") -> float:
    """1.0 when the completion holds JSON valid under `schema` (or the row's `row[schema_key]`,
    a dict or a JSON string)."""
    if schema is None:
        schema = sample.row[schema_key]
        schema = json.loads(schema) if isinstance(schema, str) else schema
    value = extract_json(sample.completion)
    if value is None:
        return 0.0
    return float(jsonschema.Draft202012Validator(schema).is_valid(value))
