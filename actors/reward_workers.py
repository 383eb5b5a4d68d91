"""Reward workers: a pool of Ray actors scoring batches with `dsarl.rewards.RewardCombiner`.

    pool = RewardPool(cfg)                       # cfg: dsarl.rewards.config.RewardConfig; needs ray.init
    results, metrics = pool.score(samples)       # one dict per sample, input order

A batch is split into `num_workers` chunks that keep each group_id whole (group rewards see all
G samples). Inside a worker every (sample, component) call has `cfg.timeout_s`; a call that raises,
hangs or returns NaN scores 0 for that component (see `RewardCombiner`). Around that, the pool
gives each chunk a deadline (`len(chunk) * len(components) * timeout_s + DEADLINE_SLACK_S`):
a worker that misses it (stuck in C code holding the GIL) or dies (segfault, os._exit) is
replaced, and its chunk scores 0 on every component, counted in `reward/worker_failures`. A
worker holding more than `MAX_ABANDONED_THREADS` hung calls is replaced after the batch.
"""
from __future__ import annotations

import logging
import time

import ray

from dsarl.rewards.combiner import FAILURES, RewardCombiner
from dsarl.rewards.config import RewardConfig
from dsarl.rewards.types import RewardSample

logger = logging.getLogger(__name__)
DEADLINE_SLACK_S = 30.0
MAX_ABANDONED_THREADS = 8


@ray.remote
class RewardWorker:
    """Thin shell: owns one RewardCombiner and scores the chunks it is sent."""

    def __init__(self, cfg: RewardConfig):
        self.combiner = RewardCombiner(cfg)

    def score(self, samples: list[RewardSample]) -> tuple[list[dict[str, float]], dict[str, float]]:
        return self.combiner.score(samples)


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
        """placement: optional (worker index) -> actor options (a placement-group bundle)."""
        if cfg.num_workers < 1:
            raise ValueError(f"RewardConfig.num_workers must be >= 1, got {cfg.num_workers}")
        RewardCombiner(cfg)  # fail here, in the driver, on a bad config (unknown reward, bad kwargs)
        self.cfg = cfg
        self.keys = [c.key for c in cfg.components]
        self.placement = placement
        self.workers = [self._new_worker(w) for w in range(cfg.num_workers)]

    def _new_worker(self, w: int):
        options = self.placement(w) if self.placement else {"num_cpus": self.cfg.num_cpus_per_worker}
        return RewardWorker.options(**options).remote(self.cfg)

    def _replace(self, w: int, reason: str) -> None:
        logger.warning("reward worker %d replaced: %s", w, reason)
        ray.kill(self.workers[w], no_restart=True)
        self.workers[w] = self._new_worker(w)

    def score(self, samples: list[RewardSample]) -> tuple[list[dict[str, float]], dict[str, float]]:
        """(results in input order, metrics): see RewardCombiner.score; plus reward/worker_failures."""
        if not samples:
            return [], {"reward/failures": 0.0, "reward/worker_failures": 0.0}
        chunks = split_by_group(samples, len(self.workers))
        refs = [self.workers[w].score.remote([samples[i] for i in idx]) for w, idx in enumerate(chunks)]
        deadline = time.monotonic() + DEADLINE_SLACK_S + self.cfg.timeout_s * len(self.keys) * max(map(len, chunks))
        results: list = [None] * len(samples)
        chunk_metrics, worker_failures = [], 0
        for w, (idx, ref) in enumerate(zip(chunks, refs)):
            ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            try:
                if not ready:
                    raise TimeoutError(f"chunk of {len(idx)} samples missed its deadline")
                chunk_results, metrics = ray.get(ref)
            except (TimeoutError, ray.exceptions.RayError) as e:
                self._replace(w, f"{type(e).__name__}: {e}")
                worker_failures += len(idx)
                chunk_results = [{**{k: 0.0 for k in self.keys}, "total": 0.0} for _ in idx]
                metrics = {}
            for i, r in zip(idx, chunk_results):
                results[i] = r
            chunk_metrics.append(metrics)
            if metrics.get("reward/abandoned_threads", 0) > MAX_ABANDONED_THREADS:
                self._replace(w, f"{metrics['reward/abandoned_threads']:.0f} hung reward calls")
        return results, self._merge(results, chunk_metrics, worker_failures)

    def _merge(self, results, chunk_metrics, worker_failures: int) -> dict[str, float]:
        n = len(results)
        merged = {f"reward/{k}/mean": sum(r[k] for r in results) / n for k in [*self.keys, "total"]}
        counted = [f"reward/{k}/{s}s" for k in self.keys for s in FAILURES]
        for name in [*counted, "reward/failures", "reward/abandoned_threads"]:
            merged[name] = float(sum(m.get(name, 0.0) for m in chunk_metrics))
        merged["reward/worker_failures"] = float(worker_failures)
        merged["reward/failures"] += worker_failures * len(self.keys)
        return merged

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
