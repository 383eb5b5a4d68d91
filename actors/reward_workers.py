"""Reward workers: a pool of Ray actors scoring batches with `dsarl.rewards.RewardCombiner`.

    pool = RewardPool(cfg)                       # cfg: dsarl.rewards.config.RewardConfig; needs ray.init
    results, metrics = pool.score(samples)       # one dict (None: unscored) per sample, input order
    # raises dsarl.rewards.health.RewardComponentDead when a component keeps failing (the run must stop)

A batch is split into `num_workers` chunks that keep each group_id whole (group rewards see all G
samples). Inside a worker every call runs in the combiner's child process under a hard limit (see
`RewardCombiner`): a call that raises, hangs (even in C code holding the GIL) or returns NaN scores
its component's failure value, and the worker carries on.

A worker lost at the Ray level (its process killed, OOM, its node gone) is different: nothing scored
its chunk, so nothing is made up for it. The pool's own deadline per chunk,
`dsarl.rewards.timeouts.time_bound(len(chunk), ...) + DEADLINE_SLACK_S` (every call running out its
limit and being restarted), catches a worker that never answers. A lost worker is replaced and its
chunk scored again on the replacement, up to `cfg.chunk_retries` times. A chunk lost on every try (two or more)
holds a sample that kills any worker (a reward that exhausts memory, a plug-in killing its host): its
groups are then scored by halves, so the killer is isolated to its own group, and that group comes back
as None ("unscored": no components, no total), which the driver keeps out of the loss
(`dsarl.learner.group_building.build_groups` drops its group) and flags in the rollout log.
Metrics: reward/worker_failures (workers lost), reward/chunk_retries (chunks or parts sent again),
reward/unscored_samples. None of these count as a component's failure (`RewardComponentDead` watches
those): the worker failed, not the reward.

A sample's dict holds only the components that scored it (a None return leaves its key out) and
sub-scores only of successful calls, so samples may have different keys.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter

import ray

from dsarl.rewards.combiner import RewardCombiner, ScoredBatch, reward_metrics
from dsarl.rewards.config import RewardConfig
from dsarl.rewards.health import FailureMonitor
from dsarl.rewards.registry import validate_reward_config
from dsarl.rewards.timeouts import time_bound
from dsarl.rewards.types import RewardSample

from .threads import follow_cpu_share

logger = logging.getLogger(__name__)
DEADLINE_SLACK_S = 30.0


@ray.remote
class RewardWorker:
    """Thin shell: owns one RewardCombiner (and so its reward process) and scores the chunks it is sent."""

    def __init__(self, cfg: RewardConfig):
        follow_cpu_share()  # before the combiner starts its reward process, which inherits the limit
        self.combiner = RewardCombiner(cfg)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

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
        if cfg.chunk_retries < 0:
            raise ValueError(f"RewardConfig.chunk_retries must be >= 0, got {cfg.chunk_retries}")
        validate_reward_config(cfg)
        self.cfg = cfg
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

    def pids(self) -> list[int]:
        """The worker processes' ids (a fault test kills one)."""
        return ray.get([w.pid.remote() for w in self.workers])

    def _deadline(self, n: int) -> float:
        """When a chunk of n samples sent now is lost if it has not come back (see module docstring)."""
        return time.monotonic() + DEADLINE_SLACK_S + time_bound(n, len(self.cfg.components), self.cfg.timeout_s)

    def _wait(self, w: int, ref, deadline: float, n: int) -> ScoredBatch | None:
        """Worker w's answer to `ref`, or None after replacing the worker (lost, or past the deadline)."""
        ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
        try:
            if not ready:
                raise TimeoutError(f"chunk of {n} samples missed its deadline")
            return ray.get(ref)
        except (TimeoutError, ray.exceptions.RayError) as e:
            self._replace(w, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None

    def _send(self, w: int, samples: list[RewardSample]) -> ScoredBatch | None:
        return self._wait(w, self.workers[w].score.remote(samples), self._deadline(len(samples)), len(samples))

    def _collect_chunk(self, w: int, chunk: list[RewardSample], ref, deadline: float):
        """Worker w's scores of `chunk` (sent as `ref`), sending it again to a replacement worker each time
        the worker is lost, up to cfg.chunk_retries times. A chunk lost on every try (two or more) holds a sample that
        kills whichever worker scores it (a reward exhausting memory, a plug-in killing its host): its
        groups are scored apart, halving, so only that sample's group stays unscored.
        -> ([(positions in chunk, ScoredBatch | None)], workers lost, chunks sent again)."""
        for attempt in range(self.cfg.chunk_retries + 1):
            batch = self._wait(w, ref, deadline, len(chunk))
            if batch is not None:
                return [(list(range(len(chunk))), batch)], attempt, attempt
            if attempt < self.cfg.chunk_retries:
                logger.warning("reward chunk of %d samples sent again (retry %d of %d)", len(chunk), attempt + 1,
                               self.cfg.chunk_retries)
                ref, deadline = self.workers[w].score.remote(chunk), self._deadline(len(chunk))
        if self.cfg.chunk_retries == 0:  # no retries asked for: none by parts either
            return [(list(range(len(chunk))), None)], 1, 0
        pieces, lost, sent = self._isolate(w, chunk, list(range(len(chunk))))
        unscored = sum(len(pos) for pos, batch in pieces if batch is None)
        logger.error("reward chunk of %d samples lost on %d worker(s); scored by parts, %d sample(s) stay unscored",
                     len(chunk), self.cfg.chunk_retries + 1 + lost, unscored)
        return pieces, self.cfg.chunk_retries + 1 + lost, self.cfg.chunk_retries + sent

    def _isolate(self, w: int, chunk: list[RewardSample], positions: list[int]):
        """Scores `positions` of a chunk that kills its worker by halves of whole groups (group rewards see
        all G samples), recursing into a half that is lost again; a lost single group stays unscored.
        -> ([(positions, ScoredBatch | None)], workers lost, pieces sent)."""
        groups: dict[int, list[int]] = {}
        for i in positions:
            groups.setdefault(chunk[i].group_id, []).append(i)
        if len(groups) == 1:
            return [(positions, None)], 0, 0
        order = list(groups.values())
        pieces, lost, sent = [], 0, 0
        for half in (order[:len(order) // 2], order[len(order) // 2:]):
            part = [i for g in half for i in g]
            batch = self._send(w, [chunk[i] for i in part])
            sent += 1
            if batch is not None:
                pieces.append((part, batch))
                continue
            sub, sub_lost, sub_sent = self._isolate(w, chunk, part)
            pieces += sub
            lost, sent = lost + 1 + sub_lost, sent + sub_sent
        return pieces, lost, sent

    def score(self, samples: list[RewardSample]) -> tuple[list[dict[str, float] | None], dict[str, float]]:
        """(results in input order, None for an unscored sample; metrics): see RewardCombiner.score and
        reward_metrics (over the scored samples), plus reward/worker_failures, reward/chunk_retries,
        reward/unscored_samples and reward/process_restarts. Raises RewardComponentDead."""
        if not samples:
            return [], {"reward/failures": 0.0, "reward/worker_failures": 0.0, "reward/chunk_retries": 0.0,
                        "reward/unscored_samples": 0.0}
        indices = split_by_group(samples, len(self.workers))
        chunks = [[samples[i] for i in idx] for idx in indices]
        refs = [self.workers[w].score.remote(chunk) for w, chunk in enumerate(chunks)]
        deadline = self._deadline(max(map(len, chunks)))  # the chunks run at once: one deadline for all
        results: list = [None] * len(samples)
        counts, first_errors, restarts, lost_workers, retries = Counter(), {}, 0, 0, 0
        for w, (idx, chunk, ref) in enumerate(zip(indices, chunks, refs)):
            pieces, lost, resent = self._collect_chunk(w, chunk, ref, deadline)
            lost_workers += lost
            retries += resent
            for positions, batch in pieces:
                if batch is None:
                    continue
                for p, r in zip(positions, batch.results):
                    results[idx[p]] = r
                counts.update(batch.counts)
                for key, error in batch.first_errors.items():
                    first_errors.setdefault(key, error)
                restarts += batch.restarts
        scored = [r for r in results if r is not None]
        metrics = reward_metrics(self.cfg.components, scored, counts, len(scored))
        metrics["reward/worker_failures"] = float(lost_workers)
        metrics["reward/chunk_retries"] = float(retries)
        metrics["reward/unscored_samples"] = float(len(samples) - len(scored))
        metrics["reward/process_restarts"] = float(restarts)
        self.monitor.update(counts, len(scored), first_errors)
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
