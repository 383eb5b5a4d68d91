"""What a reward returned -> the numbers the combiner keeps.

A reward returns a number, a dict of numbers (sub-scores; `"score"` is the component's value, else
the mean of the values) or None ("no score": the sample is left out of this component). Numbers
are Python's (bool, int, float, anything with `__float__` such as Fraction or Decimal) and array
scalars duck-typed without importing their library: numpy scalars (np.float32, np.int64, np.bool_)
and 0-dim or one-element numpy arrays / torch tensors, read with `.item()`. Strings, lists and
other containers are not numbers.
"""
from __future__ import annotations

import math
from typing import Optional


def to_number(x) -> float:
    """One reward number -> float; ValueError for a non-number or a non-finite value."""
    if isinstance(x, (str, bytes)) or not (hasattr(x, "__float__") or hasattr(x, "item")):
        raise ValueError(f"reward returned {type(x).__name__} {x!r:.80}, expected a number")
    if not isinstance(x, (int, float)):  # an array scalar: numpy (`.size`) or torch (`.numel()`)
        n = x.numel() if callable(getattr(x, "numel", None)) else getattr(x, "size", 1)
        if n != 1:
            raise ValueError(f"reward returned {type(x).__name__} with {n} elements, expected a number")
        x = x.item() if hasattr(x, "item") else x
    try:
        value = float(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"reward returned {type(x).__name__} {x!r:.80}, not a float: {e}") from e
    if not math.isfinite(value):
        raise ValueError(f"reward returned a non-finite value: {value!r}")
    return value


def to_value(raw) -> Optional[tuple[float, dict[str, float]]]:
    """A reward return -> (component value, sub-scores), or None for "no score".
    Raises ValueError on NaN/inf and non-numbers."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        if not raw:
            raise ValueError("reward returned an empty dict")
        subs = {str(k): to_number(v) for k, v in raw.items()}
        value = subs.pop("score") if "score" in subs else sum(subs.values()) / len(subs)
        return value, subs
    return to_number(raw), {}
