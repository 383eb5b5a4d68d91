"""Small `(sample) -> bool` predicates for rubric `python` checks (examples for users' own)."""
from __future__ import annotations

import re

from dsarl.rewards.types import RewardSample

_APOLOGY = re.compile(r"\b(sorry|i apologi[sz]e|as an ai)\b", re.IGNORECASE)


def no_apology(sample: RewardSample) -> bool:
    """True when the completion neither apologises nor disclaims itself as an AI."""
    return _APOLOGY.search(sample.completion) is None
