"""Reward workers: a pool of Ray actors scoring batches with `dsarl.rewards.RewardCombiner`.

    pool = RewardPool(cfg)                       # cfg: dsarl.rewards.config.RewardConfig; needs ray.init
    results, metrics = pool.score(samples)       # one dict per sample, input order
    # raises dsarl.rewards.health.RewardComponentDead when a component keeps failing (the run must stop)

A batch is split into `num_workers` chunks that keep each group_id whole (group rewards see all G
samples). Inside a worker every call runs in the combiner's child process under a hard limit (see
`RewardCombiner`): a call that raises, hangs (even in C code holding the GIL) or returns NaN scores
its component's failure value, and the worker carries on. The pool's own deadline per chunk,
`dsarl.rewards.timeouts.time_bound(len(chunk), ...) + DEADLINE_SLACK_S` (every call running out its
limit and being restarted), is a backstop for a worker lost at the Ray level: such a worker is replaced, its
chunk scores every component's failure value and is counted in `reward/worker_failures` (not in the
components' failure counts, which `RewardComponentDead` watches).

A sample's dict holds only the components that scored it (a None return leaves its key out) and
sub-scores only of successful calls, so samples may have different keys.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import ray

from dsarl.rewards.combiner import RewardCombiner, ScoredBatch, failure_values, reward_metrics
from dsarl.rewards.config import RewardConfig
from dsarl.rewards.health import FailureMonitor
from dsarl.rewards.registry import validate_reward_config
from dsarl.rewards.timeouts import time_bound
from dsarl.rewards.types import RewardSample

logger = logging.getLogger(__name__)
DEADLINE_SLACK_S = 30.0


@ray.remote
class RewardWorker:
    """Thin shell: owns one RewardCombiner (and so its reward process) and scores the chunks it is sent."""

    def __init__(self, cfg: RewardConfig):
        self.combiner = RewardCombiner(cfg)

    def ready(self) -> bool:
        return True

    def score(self, samples: list[RewardSample]) -> ScoredBatch:
        return self.combiner.score_report(samples)

    def close(self) -> None:
        self.combiner.close()


def split_by_group(samples: list[RewardSample], n: int) -> list[list[int]]:
    """Indices of `samples` in at most n chunks, each group_id whole, sizes balanced greedily."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group_id, []).append(i)
    chunks: list[list[int]] = [[] for _ in range(max(1, n))]
    for idx in sorted(groups.values(), key=len, reverse=True):
        min(chunks, key=len).extend(idx)
    return [sorted(c) for c in chunks if c]


class RewardPool:
    """`cfg.num_workers` RewardWorker actors, `cfg.num_cpus_per_worker` CPUs each."""

    def __init__(self, cfg: RewardConfig, placement=None):
        """placement: optional (worker index) -> actor options (a placement-group bundle).
        Raises ValueError on a bad config (checked here, in the driver) or a reward that fails to build."""
        if cfg.num_workers < 1:
            raise ValueError(f"RewardConfig.num_workers must be >= 1, got {cfg.num_workers}")
        validate_reward_config(cfg)
        self.cfg = cfg
        self.failure_values = failure_values(cfg)
        self.monitor = FailureMonitor([c.key for c in cfg.components], cfg.max_failure_rate, cfg.failure_window)
        self.placement = placement
        self.workers = [self._new_worker(w) for w in range(cfg.num_workers)]
        try:
            ray.get([w.ready.remote() for w in self.workers])
        except ray.exceptions.RayError as e:
            self.shutdown()
            raise ValueError(f"reward workers failed to start: {e}") from None

    def _new_worker(self, w: int):
        options = self.placement(w) if self.placement else {"num_cpus": self.cfg.num_cpus_per_worker}
        return RewardWorker.options(**options).remote(self.cfg)

    def _replace(self, w: int, reason: str) -> None:
        logger.warning("reward worker %d replaced: %s", w, reason)
        ray.kill(self.workers[w], no_restart=True)
        self.workers[w] = self._new_worker(w)

    def _lost(self, n: int) -> list[dict[str, float]]:
        failed = dict(self.failure_values)
        total = sum(c.weight * failed[c.key] for c in self.cfg.components)
        return [{**failed, "total": total} for _ in range(n)]

    def score(self, samples: list[RewardSample]) -> tuple[list[dict[str, float]], dict[str, float]]:
        """(results in input order, metrics): see RewardCombiner.score and reward_metrics, plus
        reward/worker_failures and reward/process_restarts. Raises RewardComponentDead."""
        if not samples:
            return [], {"reward/failures": 0.0, "reward/worker_failures": 0.0}
        chunks = split_by_group(samples, len(self.workers))
        refs = [self.workers[w].score.remote([samples[i] for i in idx]) for w, idx in enumerate(chunks)]
        bound = time_bound(max(map(len, chunks)), len(self.cfg.components), self.cfg.timeout_s)
        deadline = time.monotonic() + DEADLINE_SLACK_S + bound
        results: list = [None] * len(samples)
        counts, first_errors, restarts, lost = Counter(), {}, 0, 0
        for w, (idx, ref) in enumerate(zip(chunks, refs)):
            ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            try:
                if not ready:
                    raise TimeoutError(f"chunk of {len(idx)} samples missed its deadline")
                batch: ScoredBatch = ray.get(ref)
            except (TimeoutError, ray.exceptions.RayError) as e:
                self._replace(w, f"{type(e).__name__}: {e}")
                lost += len(idx)
                batch = ScoredBatch(self._lost(len(idx)))
            for i, r in zip(idx, batch.results):
                results[i] = r
            counts.update(batch.counts)
            for key, error in batch.first_errors.items():
                first_errors.setdefault(key, error)
            restarts += batch.restarts
        metrics = reward_metrics(self.cfg.components, results, counts, len(samples) - lost)
        metrics["reward/failures"] += lost * len(self.cfg.components)
        metrics["reward/worker_failures"] = float(lost)
        metrics["reward/process_restarts"] = float(restarts)
        self.monitor.update(counts, len(samples) - lost, first_errors)
        return results, metrics

    def shutdown(self) -> None:
        """End each worker's reward process, then the workers."""
        try:
            ray.get([w.close.remote() for w in self.workers], timeout=10)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
