"""Teachers for specialist distillation: one pool of rollout workers per domain, each worker holding
that domain's specialist. They sample (SFT data) and score in teacher mode (on-policy distillation).

    teachers = TeacherPool({"math": ckpt_m, "code": ckpt_c}, num_workers=1, num_cpus_per_worker=0.25)
    comps = teachers.generate("math", prompt_ids, SamplingParams(n=4))      # specialist rollouts
    logp = teachers.log_probs(["code", "math"], prompt_ids, completion_ids)  # routed by domain

`TeacherWorker` is a RolloutWorker plus `log_probs`: the full log-distribution at every completion
position (learner/distill.py `completion_log_probs`), which the exact reverse KL needs; the plain
`score` gives only the sampled token's logprob. Each sample goes to the teacher of its own domain
(`route_by_domain`); all domains' requests are in flight at once. `mixture_log_probs` scores a sample
by several specialists and returns the log of their mean distribution (a domain taught by every
specialist that is good at it, chosen on validation rows: launch/distill_select.py).
"""
import math

import ray
import torch

from dsarl.learner.distill import Sequences, completion_log_probs

from .engine import SamplingParams
from dsarl.data.step_types import Completion
from .rollout_workers import RolloutPool, RolloutWorker


class TeacherWorker(RolloutWorker):
    def log_probs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  temperature: float = 1.0) -> list[torch.Tensor]:
        """Per sequence: fp32 [len(completion), V] log pi_teacher(. | prompt, completion_<t)."""
        engine = self.engine
        return completion_log_probs(engine.model, Sequences(prompt_ids, completion_ids), temperature,
                                    engine.attention, engine.max_batch_size)


class DomainTeachers(RolloutPool):
    """A RolloutPool of TeacherWorkers for one domain's specialist (same sharding, plus log_probs)."""

    def __init__(self, num_workers: int, checkpoint_dir: str, num_cpus_per_worker: float = 0.25,
                 engine_kwargs: dict | None = None, num_threads: int = 0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        actor = ray.remote(TeacherWorker).options(num_cpus=num_cpus_per_worker)
        self.workers = [actor.remote(checkpoint_dir, None, None, "native", engine_kwargs, None, num_threads)
                        for _ in range(num_workers)]
        ray.get([w.weight_version.remote() for w in self.workers])  # surface construction errors here
        self._init_state()  # teachers' weights never change, but the pool's generate checks the sync state

    def submit_log_probs(self, prompt_ids, completion_ids, temperature: float) -> list:
        return [w.log_probs.remote(prompt_ids[a:b], completion_ids[a:b], temperature)
                for w, (a, b) in zip(self.workers, self._shards(len(prompt_ids))) if b > a]


def route_by_domain(domains: list[str]) -> dict[str, list[int]]:
    """Sample indices per domain, in input order within each domain."""
    routes: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        routes.setdefault(d, []).append(i)
    return routes


class TeacherPool:
    def __init__(self, checkpoints: dict[str, str], num_workers: int = 1, num_cpus_per_worker: float = 0.25,
                 max_batch_size: int = 64, num_threads: int = 0):
        self.pools = {d: DomainTeachers(num_workers, str(ckpt), num_cpus_per_worker,
                                        {"max_batch_size": max_batch_size}, num_threads)
                      for d, ckpt in checkpoints.items()}

    def generate(self, domain: str, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        return self._pool(domain).generate(prompt_ids, params)

    def log_probs(self, domains: list[str], prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  temperature: float = 1.0) -> list[torch.Tensor]:
        """Each sample scored by its own domain's teacher; results in input order."""
        if not len(domains) == len(prompt_ids) == len(completion_ids):
            raise ValueError(f"{len(domains)} domains, {len(prompt_ids)} prompts, {len(completion_ids)} completions")
        routes = route_by_domain(domains)
        refs = {d: self._pool(d).submit_log_probs([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx],
                                                  temperature)
                for d, idx in routes.items()}
        out: list = [None] * len(domains)
        for d, idx in routes.items():
            for i, logp in zip(idx, [x for shard in ray.get(refs[d]) for x in shard]):
                out[i] = logp
        return out

    def mixture_log_probs(self, teacher_sets: list[list[str]], prompt_ids: list[list[int]],
                          completion_ids: list[list[int]], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per sample, the log of the mean of its teachers' distributions, log (1/k) sum_j pi_j(. | ...)
        (one teacher: its own log-probs). Every (sample, teacher) pair is one request of `log_probs`,
        all in flight at once; results are combined in input order, so the sum is the same every run."""
        if len(teacher_sets) != len(prompt_ids):
            raise ValueError(f"{len(teacher_sets)} teacher sets, {len(prompt_ids)} prompts")
        pairs = [(i, t) for i, ts in enumerate(teacher_sets) for t in ts]
        if any(not ts for ts in teacher_sets):
            raise ValueError("every sample needs at least one teacher")
        logp = self.log_probs([t for _, t in pairs], [prompt_ids[i] for i, _ in pairs],
                              [completion_ids[i] for i, _ in pairs], temperature)
        per_sample: list[list[torch.Tensor]] = [[] for _ in teacher_sets]
        for (i, _), lp in zip(pairs, logp):
            per_sample[i].append(lp)
        return [lps[0] if len(lps) == 1 else torch.logsumexp(torch.stack(lps), dim=0) - math.log(len(lps))
                for lps in per_sample]  # [Lc, V] each

    def _pool(self, domain: str) -> DomainTeachers:
        if domain not in self.pools:
            raise ValueError(f"no teacher for domain {domain!r}; teachers: {sorted(self.pools)}")
        return self.pools[domain]

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        self.pools = {}
