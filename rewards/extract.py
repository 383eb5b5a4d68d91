"""Final-answer extraction from free text. Every function here is total: it never raises on any str.

- `last_boxed(text)`: content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces), or None.
- `last_number(text)`: the last number written in the text ("1,234.5", "-3", "2/3", "1e-3"), or None.
- `final_answer(text)`: `last_boxed`, else `last_number`, else None.
- `parse_number(s)`: a float when `s` is a plain number, possibly with a unit or trailing text
  ("0.5", "1/2", "\\frac{1}{2}", "50%", "12 cm", "$3.00"); None otherwise.
- `parse_exact(s)`: the same value as an exact Fraction (so integers compare exactly).
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")
_FRAC = re.compile(r"^\\[dt]?frac\s*\{\s*([-+]?\d+(?:\.\d+)?)\s*\}\s*\{\s*([-+]?\d+(?:\.\d+)?)\s*\}$")
_LEADING_NUMBER = re.compile(r"^([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?)(?:\s*/\s*(\d+))?\s*(%?)")
# Tail after a number that still means "just this number": a unit word or symbol, punctuation.
# One-letter tails are units only for SI symbols, so "3x" stays symbolic.
_UNIT_TAIL = re.compile(r"^(?:\\[,;! ]|\s)*(?:\\(?:text|mathrm|mbox)\{\s*[A-Za-z°%$ ]*\}|(?:[A-Za-z°$%]{2,}|[mgsLKhJNVWA°$%])(?:\^?\d)?)?\s*[.!,;]*\s*$")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last balanced `\\boxed{...}`; None if there is none or its braces never close."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def last_number(text: str) -> Optional[str]:
    """The last number in `text` as written (commas kept), or None."""
    matches = _NUMBER.findall(text)
    return matches[-1].strip() if matches else None


def final_answer(text: str) -> Optional[str]:
    boxed = last_boxed(text)
    return boxed if boxed is not None else last_number(text)


def _strip_wrappers(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:left|right)", "", s)
    s = s.replace("\\!", "").replace("\\$", "").replace("\\%", "%")
    while len(s) >= 2 and s[0] in "({[" and s[-1] in ")}]" and s.count("(") <= 1:
        s = s[1:-1].strip()
    return s.lstrip("$").strip()


def parse_exact(s: str) -> Optional[Fraction]:
    """Exact value of a plain numeric answer (decimals as written: "0.1" is 1/10), ignoring a trailing
    unit; None for anything symbolic."""
    s = _strip_wrappers(s)
    m = _FRAC.match(s)
    if m:
        den = Fraction(m.group(2))
        return Fraction(m.group(1)) / den if den != 0 else None
    m = _LEADING_NUMBER.match(s)
    if m is None or not _UNIT_TAIL.match(s[m.end():]):
        return None
    try:
        value = Fraction(m.group(1).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    if m.group(2):
        if int(m.group(2)) == 0:
            return None
        value /= int(m.group(2))
    if m.group(3):
        value /= 100
    return value


def parse_number(s: str) -> Optional[float]:
    """Value of a plain numeric answer, ignoring a trailing unit; None for anything symbolic."""
    value = parse_exact(s)
    try:
        return None if value is None else float(value)
    except OverflowError:
        return None
