"""A dead reward stops the run: per-component failure shares over the last few scoring calls.

A component is dead when, over its last `window` scoring calls (batches),

    failures / samples >= max_failure_rate        (failures: error + timeout + nan)

With the defaults (rate 1.0, window 1) that is "it failed on every sample of one batch". Samples a
component left unscored (None) count as calls that did not fail; samples of a lost Ray worker are
not counted (the worker failed, not the component). `RewardComponentDead` carries the first error's
full text (a traceback for a raised exception), so the run ends saying why.
"""
from __future__ import annotations

from collections import Counter, deque

FAILURES = ("error", "timeout", "nan")


class RewardComponentDead(RuntimeError):
    """A reward component failed on too many samples; the message holds its first error."""

    def __init__(self, component: str, failures: int, calls: int, batches: int, max_failure_rate: float,
                 first_error: str):
        self.component, self.failures, self.calls, self.first_error = component, failures, calls, first_error
        super().__init__(f"reward component {component!r} failed on {failures} of {calls} samples over the last "
                         f"{batches} batch(es) (max_failure_rate={max_failure_rate}); first error:\n{first_error}")


class FailureMonitor:
    """Updated after each scoring call; raises RewardComponentDead (see module docstring)."""

    def __init__(self, components: list[str], max_failure_rate: float = 1.0, window: int = 1):
        if not max_failure_rate > 0 or window < 1:
            raise ValueError(f"need max_failure_rate > 0 and window >= 1, got {max_failure_rate}, {window}")
        self.max_failure_rate = max_failure_rate
        # per component: (failures, samples, first error text) of each of the last `window` batches
        self.history = {c: deque(maxlen=window) for c in components}

    def update(self, counts: Counter, samples: int, first_errors: dict[str, str]) -> None:
        """counts: (component, status) -> samples; samples: how many were scored; first_errors:
        component -> its first failure's text in this batch."""
        if samples == 0:
            return
        for component, past in self.history.items():
            past.append((sum(counts[(component, s)] for s in FAILURES), samples, first_errors.get(component)))
            failures, calls = sum(h[0] for h in past), sum(h[1] for h in past)
            if failures / calls >= self.max_failure_rate:
                first = next((h[2] for h in past if h[2]), "")
                raise RewardComponentDead(component, failures, calls, len(past), self.max_failure_rate, first)
