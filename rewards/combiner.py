"""RewardCombiner: every configured component on every sample, each call under a time limit.

    total_i = sum_c weight_c * value_c(i)

`value_c(i)` is the component's value before weighting: its float, or for a dict return its
`"score"` key (or the mean of its values when there is none); the other keys of a dict are logged
as `"<component>/<key>"`. A call that raises, runs past its time limit or returns NaN/inf (or a
non-number) scores 0 for that component, is logged, and is counted in the metrics; the batch
always finishes. Group components (`group: true`) are called once per group_id with the group's
samples in input order, under `timeout_s * len(group)`.

Time limits use a daemon thread per call: a hung call is abandoned (it cannot be killed from
inside the process) and counted as `reward/abandoned_threads` while it lives. `RewardPool`
(actors/reward_workers.py) replaces a worker process whose abandoned threads pile up.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from typing import Callable

from dsarl.rewards.config import RewardComponentConfig, RewardConfig
from dsarl.rewards.registry import build_reward_fn
from dsarl.rewards.types import RewardSample

logger = logging.getLogger(__name__)
FAILURES = ("error", "timeout", "nan")


def call_with_timeout(fn: Callable, arg, timeout_s: float) -> tuple[object, str, str, threading.Thread]:
    """Run `fn(arg)` in a daemon thread; (value, status, error text, thread). status: ok | error | timeout."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(arg)
        except BaseException as e:  # noqa: BLE001 - a reward's failure must not end the batch
            box["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=target, daemon=True, name="dsarl-reward-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return None, "timeout", f"no result after {timeout_s:.3g}s", thread
    if "error" in box:
        return None, "error", box["error"], thread
    return box.get("value"), "ok", "", thread


def to_value(raw) -> tuple[float, dict[str, float]]:
    """A reward return -> (component value, sub-scores). Raises ValueError on NaN/inf/non-numbers."""
    if isinstance(raw, dict):
        subs = {str(k): float(v) for k, v in raw.items()}
        if not subs:
            raise ValueError("reward returned an empty dict")
        value = subs.pop("score") if "score" in subs else sum(subs.values()) / len(subs)
    elif isinstance(raw, (int, float)):  # bool is an int
        value, subs = float(raw), {}
    else:
        raise ValueError(f"reward returned {type(raw).__name__}, expected float or dict[str, float]")
    if not all(math.isfinite(v) for v in (value, *subs.values())):
        raise ValueError(f"reward returned a non-finite value: {raw!r}")
    return value, subs


class RewardCombiner:
    """Scores batches of RewardSample with the components of a RewardConfig (see module docstring)."""

    def __init__(self, cfg: RewardConfig):
        if not cfg.components:
            raise ValueError("RewardConfig.components is empty: configure at least one reward")
        if not cfg.timeout_s > 0:
            raise ValueError(f"RewardConfig.timeout_s must be > 0, got {cfg.timeout_s}")
        keys = [c.key for c in cfg.components]
        if len(set(keys)) != len(keys) or "total" in keys:
            raise ValueError(f"reward component names must be unique and not 'total', got {keys} "
                             f"(set `label` to use one function twice)")
        self.cfg = cfg
        self.components: list[tuple[RewardComponentConfig, Callable]] = [
            (c, build_reward_fn(c.name, c.kwargs)) for c in cfg.components]
        self.failure_counts: Counter = Counter()  # ("component", status) -> count over the lifetime
        self._abandoned: list[threading.Thread] = []

    def abandoned_threads(self) -> int:
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        return len(self._abandoned)

    def score_batch(self, samples: list[RewardSample]) -> list[dict[str, float]]:
        """One dict per sample, in input order: every component's unweighted value, "total", and
        "<component>/<key>" sub-scores of dict returns."""
        return self.score(samples)[0]

    def score(self, samples: list[RewardSample]) -> tuple[list[dict[str, float]], dict[str, float]]:
        """(score_batch's results, metrics): per component mean value and failure counts."""
        results: list[dict[str, float]] = [{} for _ in samples]
        batch_failures: Counter = Counter()
        for comp, fn in self.components:
            outcomes = self._run_group(comp, fn, samples) if comp.group else self._run_each(comp, fn, samples)
            for i, (raw, status, error) in enumerate(outcomes):
                value, subs = 0.0, {}
                if status == "ok":
                    try:
                        value, subs = to_value(raw)
                    except (ValueError, TypeError) as e:
                        status, error = "nan", str(e)
                if status != "ok":
                    batch_failures[(comp.key, status)] += 1
                    logger.warning("reward %s %s on sample (group %d, index %d): %s", comp.key, status,
                                   samples[i].group_id, samples[i].sample_index, error[:300])
                results[i][comp.key] = value
                results[i].update({f"{comp.key}/{k}": v for k, v in subs.items()})
        for r in results:
            r["total"] = sum(c.weight * r[c.key] for c, _ in self.components)
        self.failure_counts.update(batch_failures)
        return results, self._metrics(results, batch_failures)

    def _run_each(self, comp, fn, samples):
        outcomes = []
        for s in samples:
            raw, status, error, thread = call_with_timeout(fn, s, self.cfg.timeout_s)
            if status == "timeout":
                self._abandoned.append(thread)
            outcomes.append((raw, status, error))
        return outcomes

    def _run_group(self, comp, fn, samples):
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.group_id, []).append(i)
        outcomes: list = [None] * len(samples)
        for idx in groups.values():
            raw, status, error, thread = call_with_timeout(
                fn, [samples[i] for i in idx], self.cfg.timeout_s * len(idx))
            if status == "timeout":
                self._abandoned.append(thread)
            if status == "ok" and (not isinstance(raw, (list, tuple)) or len(raw) != len(idx)):
                status, error = "error", f"group reward returned {type(raw).__name__} for {len(idx)} samples"
            for j, i in enumerate(idx):
                outcomes[i] = (raw[j] if status == "ok" else None, status, error)
        return outcomes

    def _metrics(self, results, failures: Counter) -> dict[str, float]:
        n = max(len(results), 1)
        metrics: dict[str, float] = {}
        for comp, _ in self.components:
            metrics[f"reward/{comp.key}/mean"] = sum(r[comp.key] for r in results) / n
            for status in FAILURES:
                metrics[f"reward/{comp.key}/{status}s"] = float(failures[(comp.key, status)])
        metrics["reward/total/mean"] = sum(r["total"] for r in results) / n
        metrics["reward/failures"] = float(sum(failures.values()))
        metrics["reward/abandoned_threads"] = float(self.abandoned_threads())
        return metrics
