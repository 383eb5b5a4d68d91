"""RewardCombiner: every configured component on every sample, each call under a hard time limit.

    total_i = sum_c weight_c * value_c(i)

`value_c(i)` is the component's value before weighting: its number, or for a dict return its
`"score"` key (or the mean of its values when there is none); the other keys of a dict are logged
as `"<component>/<key>"`. A return of None means "no score": the sample has no `<component>` key,
it adds 0 to the total and is left out of the component's mean; it is not a failure.

A call that raises, runs past its limit, kills its process or returns NaN/inf (or a non-number)
scores the component's `failure_value` (config, else the reward's own attribute, else 0.0; the
built-in penalties declare -1.0), has no sub-scores, is logged and counted; the batch always
finishes. Limits: `timeout_s` per sample, `timeout_s * len(group)` for a group call, `timeout_s *
len(chunk)` for a TRL-style call on the whole chunk.

The calls run in a child process the combiner owns (`dsarl.rewards.timeouts.RewardProcess`), so the
limit holds for code stuck in C holding the GIL: a late call's process is killed and replaced, and
the combiner (and the Ray worker holding it) carries on. Components run one after another; the
calls of an `async def` reward run concurrently.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from dsarl.rewards.config import RewardComponentConfig, RewardConfig
from dsarl.rewards.health import FAILURES
from dsarl.rewards.registry import failure_value_of, resolve_reward, validate_reward_config
from dsarl.rewards.timeouts import RewardProcess
from dsarl.rewards.types import RewardSample

logger = logging.getLogger(__name__)


@dataclass
class ScoredBatch:
    """What scoring a batch gives: per sample (input order) its component values, sub-scores and
    "total"; counts[(component, status)] for status in error | timeout | nan | none; per component
    the text of its first failure (a traceback for a raised exception); reward-process restarts."""

    results: list[dict[str, float]]
    counts: Counter = field(default_factory=Counter)
    first_errors: dict[str, str] = field(default_factory=dict)
    restarts: int = 0


def failure_values(cfg: RewardConfig) -> dict[str, float]:
    """component key -> what a failed call scores (see RewardComponentConfig.failure_value)."""
    return {c.key: failure_value_of(c, resolve_reward(c.name)) for c in cfg.components}


def reward_metrics(components: list[RewardComponentConfig], results: list[dict], counts: Counter,
                   scored: int) -> dict[str, float]:
    """Per component: mean over the samples with a score, failure counts, failed share of the
    `scored` samples, unscored (None) count; the total's mean; all failures."""
    metrics: dict[str, float] = {}
    for c in components:
        values = [r[c.key] for r in results if c.key in r]
        if values:
            metrics[f"reward/{c.key}/mean"] = sum(values) / len(values)
        for status in FAILURES:
            metrics[f"reward/{c.key}/{status}s"] = float(counts[(c.key, status)])
        failed = sum(counts[(c.key, s)] for s in FAILURES)
        metrics[f"reward/{c.key}/failed_frac"] = failed / scored if scored else 0.0
        metrics[f"reward/{c.key}/unscored"] = float(counts[(c.key, "none")])
    if results:
        metrics["reward/total/mean"] = sum(r["total"] for r in results) / len(results)
    metrics["reward/failures"] = float(sum(n for (_, s), n in counts.items() if s in FAILURES))
    return metrics


def _items(unit: str, samples: list[RewardSample]) -> list[list[int]]:
    """Sample indices of each call: one per sample, per group_id (input order), or all at once."""
    if unit == "sample":
        return [[i] for i in range(len(samples))]
    if unit == "chunk":
        return [list(range(len(samples)))]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group_id, []).append(i)
    return list(groups.values())


class RewardCombiner:
    """Scores batches of RewardSample with the components of a RewardConfig (see module docstring).
    Construction validates the config and builds the rewards in the child process (a constructor's
    error raises ValueError here); `close()` ends the child."""

    def __init__(self, cfg: RewardConfig):
        validate_reward_config(cfg)
        self.cfg = cfg
        self.failure_values = failure_values(cfg)
        self.failure_counts: Counter = Counter()  # ("component", status) -> count over the lifetime
        self.process = RewardProcess(cfg.components)
        self.process.start()

    def close(self) -> None:
        self.process.close()

    def score_batch(self, samples: list[RewardSample]) -> list[dict[str, float]]:
        """One dict per sample, in input order: every scored component's unweighted value, "total",
        and "<component>/<key>" sub-scores of dict returns."""
        return self.score_report(samples).results

    def score(self, samples: list[RewardSample]) -> tuple[list[dict[str, float]], dict[str, float]]:
        """(score_batch's results, metrics): see `reward_metrics`, plus reward/process_restarts."""
        batch = self.score_report(samples)
        return batch.results, self.metrics(batch)

    def score_report(self, samples: list[RewardSample]) -> ScoredBatch:
        """The results with the failure counts and first errors behind them (what a pool merges)."""
        results: list[dict[str, float]] = [{} for _ in samples]
        batch = ScoredBatch(results)
        restarts = self.process.restarts
        for index, comp in enumerate(self.cfg.components):
            for i, (status, value, subs, error) in enumerate(self._run(index, samples)):
                if status == "ok":
                    results[i][comp.key] = value
                    results[i].update({f"{comp.key}/{k}": v for k, v in subs.items()})
                    continue
                batch.counts[(comp.key, status)] += 1
                if status == "none":
                    continue
                results[i][comp.key] = self.failure_values[comp.key]
                batch.first_errors.setdefault(comp.key, error)
                last_line = error.strip().splitlines()[-1] if error.strip() else ""
                logger.warning("reward %s %s on sample (group %d, index %d): %s", comp.key, status,
                               samples[i].group_id, samples[i].sample_index, last_line[:300])
        for r in results:
            r["total"] = sum(c.weight * r.get(c.key, 0.0) for c in self.cfg.components)
        batch.restarts = self.process.restarts - restarts
        self.failure_counts.update(batch.counts)
        return batch

    def metrics(self, batch: ScoredBatch) -> dict[str, float]:
        return {**reward_metrics(self.cfg.components, batch.results, batch.counts, len(batch.results)),
                "reward/process_restarts": float(batch.restarts)}

    def _run(self, index: int, samples: list[RewardSample]) -> list[tuple]:
        """Component `index` on every sample -> one (status, value, subs, error) per sample, input order."""
        calls = _items(self.process.units[index][0], samples)
        items = [samples[idx[0]] if self.process.units[index][0] == "sample" else [samples[i] for i in idx]
                 for idx in calls]
        per_call = self.process.run(index, items, [self.cfg.timeout_s * len(idx) for idx in calls])
        outcomes: list = [None] * len(samples)
        for idx, outs in zip(calls, per_call):
            for i, o in zip(idx, outs):
                outcomes[i] = o
        return outcomes
