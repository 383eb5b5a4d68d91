"""Rollout workers: a Ray actor per engine, and a pool the driver talks to (DESIGN.md section 4).

`RolloutWorker` is a plain class (testable without Ray); the pool wraps it with `ray.remote` and the
CPU/GPU resources from config. The pool splits prompts into contiguous shards, one per worker,
passes each shard its global prompt indices (so samples are what one engine would draw, whatever
the number of workers), and concatenates the results back in prompt order.

Partial rollouts (`partial_rollouts=True`, native engine): the worker is a `PartialRolloutWorker`, whose
`load_weights` runs in its own concurrency group (one thread) beside the generate calls (which keep
theirs, one at a time, in order), so new weights reach a generation in flight: `load_weights` only
stages them and the engine swaps them in at its next step boundary (actors/engine/native.py). Because
the two groups do not order each other's calls, each generate carries the newest version the pool has
sent (`min_version`) and waits until it is loaded or staged: a round submitted after a sync never starts
on older weights.
"""
import os
import time

import ray
import torch

from dsarl.data.step_types import Completion

from .allocator import keep_freed_memory
from .engine import NativeEngine, SamplingParams
from .packed_state import PackedState, pack_state
from .threads import follow_cpu_share
from .weight_sync import BroadcastGroup, GroupHolder, SenderLost, TensorSpec


def build_native(checkpoint_dir=None, config=None, state_dict=None, device=None, model_overrides=None,
                 **engine_kwargs):
    from dsarl.models import DSAConfig, build_model, from_pretrained, load_tokenizer

    if checkpoint_dir is not None:
        model, tokenizer = from_pretrained(checkpoint_dir, device=device, **(model_overrides or {}))
    else:
        cfg = config if isinstance(config, DSAConfig) else DSAConfig.from_dict(config)
        cfg = cfg.replace(**model_overrides) if model_overrides else cfg
        model, tokenizer = build_model(cfg, device=device), load_tokenizer(None)
    engine = NativeEngine(model.requires_grad_(False), tokenizer, **engine_kwargs)
    if state_dict is not None:
        engine.load_weights(state_dict, engine.weight_version)
    return engine


def build_vllm(checkpoint_dir=None, config=None, state_dict=None, device=None, model_overrides=None,
               **engine_kwargs):
    from .engine.vllm_engine import VLLMEngine

    if checkpoint_dir is None:
        raise ValueError("engine 'vllm' needs checkpoint_dir (vLLM loads a Hugging Face directory)")
    return VLLMEngine(checkpoint_dir, **engine_kwargs)


ENGINES = {"native": build_native, "vllm": build_vllm}


def sampler_dtype(engine: str, dtype: str, model_overrides: dict) -> tuple[dict, dict]:
    """rollout.dtype -> (extra engine kwargs, the rollout model's overrides): vLLM takes it as its `dtype`
    argument, the native engine as the model's torch_dtype; "auto" keeps the checkpoint's."""
    if dtype == "auto":
        return {}, dict(model_overrides)
    if engine == "vllm":
        return {"dtype": dtype}, dict(model_overrides)
    return {}, {**model_overrides, "torch_dtype": dtype}


class RolloutWorker:
    """Owns one engine (and its device); every method is a thin call into it."""

    def __init__(self, checkpoint_dir=None, config=None, state_dict=None, engine: str = "native",
                 engine_kwargs: dict | None = None, device=None, num_threads: int | None = None,
                 model_overrides: dict | None = None, partial_rollouts: bool = False):
        follow_cpu_share(num_threads)
        keep_freed_memory()  # a long prompt's prefill activations reuse the heap, not fresh pages
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
        if checkpoint_dir is None and config is None:
            raise ValueError("RolloutWorker needs checkpoint_dir or config")
        if device is None and torch.cuda.is_available():
            device = "cuda"
        self.engine = ENGINES[engine](checkpoint_dir, config, state_dict, device, model_overrides,
                                      **(engine_kwargs or {}))
        self.broadcast = GroupHolder()  # membership of the learner's weight broadcast group, if any
        self.partial = partial_rollouts
        if partial_rollouts and not hasattr(self.engine, "stage_weights"):
            raise ValueError(f"rollout.partial_rollouts needs the native engine, got engine {engine!r}")

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 prompt_indices: list[int] | None = None) -> list[Completion]:
        return self.engine.generate(prompts, params, prompt_indices)

    def generate_timed(self, prompts: list[list[int]], params: SamplingParams,
                       prompt_indices: list[int] | None = None,
                       min_version: int | None = None) -> tuple[list[Completion], tuple[float, float]]:
        """generate() and its wall-clock (start, end). The pool asks for the two as separate returns,
        so the driver learns when a worker was busy without a call queued behind its next generation.
        min_version (partial rollouts): first wait until weights of that version are loaded or staged."""
        if min_version is not None:
            self.engine.wait_for_version(min_version)
        start = time.time()
        return self.engine.generate(prompts, params, prompt_indices), (start, time.time())

    def pid(self) -> int:
        """This worker's process id (fault-injection tests and tools)."""
        return os.getpid()

    def score(self, prompt_ids, completion_ids, temperature: float = 1.0):
        return self.engine.score(prompt_ids, completion_ids, temperature)

    def yes_probability(self, prompts: list[str]) -> list[float]:
        return self.engine.yes_probability(prompts)

    def load_weights(self, state_dict: dict[str, torch.Tensor] | PackedState, version: int) -> int:
        """Loads the weights (partial rollouts: stages them for the generation in flight, if any).
        Returns the version loaded or staged."""
        if isinstance(state_dict, PackedState):
            state_dict = state_dict.unpack()  # views of the object store's shared memory
        if self.partial:
            self.engine.stage_weights(state_dict, version)
            return version
        self.engine.load_weights(state_dict, version)
        return self.engine.weight_version

    def weight_version(self) -> int:
        return self.engine.weight_version

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the engine holds, on CPU (native engine; tests check what a sync delivered)."""
        return {k: v.detach().cpu() for k, v in self.engine.model.state_dict().items()}

    def join_broadcast(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str,
                       timeout_s: float = 600.0) -> int:
        self.broadcast.join(master_addr, master_port, rank, world_size, backend, timeout_s)
        return rank

    def receive_broadcast(self, spec: list[TensorSpec], version: int, bucket_bytes: int) -> int:
        """Receives weight version `version` from the learner (refused if it sends another) and loads it."""
        state = self.broadcast.run(f"receiving weight version {version}", BroadcastGroup.receive, spec, version,
                                   bucket_bytes)
        if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied; load_weights skips it if so
        self.engine.load_weights(state, version)
        return self.engine.weight_version


class PartialRolloutWorker(RolloutWorker):
    """A RolloutWorker whose weight loads run beside its generate calls (Ray concurrency group
    "weights", declared where the pool creates it), so they reach a generation in flight."""

    @ray.method(concurrency_group="weights")
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        return super().load_weights(state_dict, version)


class RolloutPool:
    def __init__(self, num_workers: int, checkpoint_dir=None, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, engine: str = "native", engine_kwargs: dict | None = None,
                 config=None, state_dict=None, num_threads: int = 0, model_overrides: dict | None = None,
                 placement=None, max_restarts: int = 0, partial_rollouts: bool = False):
        """placement: optional (worker index) -> actor options (a placement-group bundle).
        max_restarts: Ray restarts a worker whose process dies (it comes back with the initial
        weights: the driver calls `restore` before using it again).
        partial_rollouts: weight syncs reach generations in flight (see the module docstring)."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if partial_rollouts and engine != "native":
            raise ValueError(f"rollout.partial_rollouts needs the native engine, got engine {engine!r}")
        state_ref = ray.put(state_dict) if state_dict is not None else None
        actor = (ray.remote(concurrency_groups={"weights": 1})(PartialRolloutWorker) if partial_rollouts
                 else ray.remote(RolloutWorker))
        options = lambda i: {**(placement(i) if placement else  # noqa: E731
                                {"num_cpus": num_cpus_per_worker, "num_gpus": num_gpus_per_worker}),
                             "max_restarts": max_restarts}
        self.workers = [actor.options(**options(i)).remote(checkpoint_dir, config, state_ref, engine, engine_kwargs,
                                                           None, num_threads, model_overrides, partial_rollouts)
                        for i in range(num_workers)]
        ray.get([w.weight_version.remote() for w in self.workers])  # surface construction errors here
        self._init_state(partial_rollouts)

    def _init_state(self, partial_rollouts: bool = False) -> None:
        """The pool's bookkeeping beside its workers (pools built on other workers call it too)."""
        self.partial_rollouts = partial_rollouts
        self._sent_version: int | None = None  # the newest version synced (partial rollouts' min_version)
        self._pending_syncs: list[ray.ObjectRef] = []  # the workers' weight loads not yet waited for
        self._pending_senders: list[ray.ObjectRef] = []  # a broadcast sync's learner-side calls
        self._spans: list[tuple[int, ray.ObjectRef]] = []  # (worker, its generate call's (start, end))

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def _shards(self, n: int) -> list[tuple[int, int]]:
        per, extra = divmod(n, self.num_workers)
        bounds, start = [], 0
        for w in range(self.num_workers):
            end = start + per + (w < extra)
            bounds.append((start, end))
            start = end
        return bounds

    def submit_generate(self, prompts: list[list[int]], params: SamplingParams) -> list[ray.ObjectRef]:
        """Starts generation on every worker's shard and returns at once; `collect` gets the results.
        Each worker runs its calls in submission order, so a generate submitted after a weight sync
        samples with the new weights, and one submitted before it with the old (partial rollouts: one
        still running when a sync arrives continues on the new weights; a later one waits for them)."""
        refs = []
        extra = (self._sent_version,) if self.partial_rollouts else ()  # no new argument when off
        for i, (w, (a, b)) in enumerate(zip(self.workers, self._shards(len(prompts)))):
            if b > a:
                out, span = w.generate_timed.options(num_returns=2).remote(prompts[a:b], params, list(range(a, b)),
                                                                          *extra)
                refs.append(out)
                self._spans.append((i, span))
        return refs

    def collect(self, refs: list[ray.ObjectRef]) -> list[Completion]:
        """The completions of a `submit_generate`, in prompt order (and any pending sync's errors)."""
        shards = ray.get(refs)
        self.wait_syncs()
        return [c for shard in shards for c in shard]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        return self.collect(self.submit_generate(prompts, params))

    def pop_busy(self) -> list[list[tuple[float, float]]]:
        """Per worker, the (start, end) wall-clock times of its generate calls that finished since the
        last pop (one still running is reported by a later pop). Asks the workers nothing."""
        busy: list[list[tuple[float, float]]] = [[] for _ in self.workers]
        if not self._spans:
            return busy
        ready, _ = ray.wait([ref for _, ref in self._spans], num_returns=len(self._spans), timeout=0)
        ready, pending = set(ready), []
        for i, ref in self._spans:
            if ref not in ready:
                pending.append((i, ref))
                continue
            try:
                busy[i].append(tuple(ray.get(ref)))
            except ray.exceptions.RayError:  # a lost worker's call: it has no interval to report
                pass
        self._spans = pending
        return busy

    def _ask_all(self, method: str, timeout_s: float = 300.0) -> list:
        """An idempotent call on every worker, asked again while a restarting worker is unavailable."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([getattr(w, method).remote() for w in self.workers])
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], temperature: float = 1.0):
        refs = [w.score.remote(prompt_ids[a:b], completion_ids[a:b], temperature)
                for w, (a, b) in zip(self.workers, self._shards(len(prompt_ids))) if b > a]
        return [s for shard in ray.get(refs) for s in shard]

    def yes_probability(self, prompts: list[str]) -> list[float]:
        refs = [w.yes_probability.remote(prompts[a:b])
                for w, (a, b) in zip(self.workers, self._shards(len(prompts))) if b > a]
        return [p for shard in ray.get(refs) for p in shard]

    def sync_weights(self, state_dict: dict[str, torch.Tensor], version: int, wait: bool = True) -> list[int]:
        """Object-store sync: one ray.put, every worker loads it. Returns each worker's version.
        `state_dict` may already be an ObjectRef (the learner's own ray.put): then nothing is copied here.
        wait=False returns at once (asynchronous rollouts: the workers load the weights after the
        generate calls already queued); the next `collect` waits for it and raises its errors."""
        if isinstance(state_dict, ray.ObjectRef):
            ref = state_dict
        else:
            ref = ray.put(pack_state(state_dict))
        self._pending_syncs.extend(w.load_weights.remote(ref, version) for w in self.workers)
        self._sent_version = version  # partial rollouts: later generate calls wait for it
        return self.wait_syncs() if wait else []

    def restore(self, weights, version: int, timeout_s: float = 300.0) -> list[int]:
        """After a worker died (and Ray restarted it): drops pending syncs, waits for every worker and
        loads `weights` (an ObjectRef or state dict; None: the initial weights are current) at `version`."""
        self._pending_syncs, self._pending_senders = [], []
        deadline = time.monotonic() + timeout_s
        while True:
            self._ask_all("weight_version", timeout_s)  # every worker back (a restarted one answers again)
            try:
                if weights is not None:
                    self.sync_weights(weights, version)
                return self._ask_all("weight_version", timeout_s)
            except ray.exceptions.ActorUnavailableError:  # one restarted again between the two calls
                if time.monotonic() > deadline:
                    raise

    def pids(self) -> list[int]:
        return self._ask_all("pid")

    def wait_syncs(self) -> list[int]:
        """Waits for the pending syncs; returns each worker's version after the last. Of several errors,
        a lost worker's is raised first (the driver restarts it), then the learner side's (a broadcast
        sender's), then the rest (survivors of a broadcast whose peer died fail too, with less to say)."""
        refs, self._pending_syncs = self._pending_syncs, []
        senders, self._pending_senders = self._pending_senders, []
        if not refs and not senders:
            return []
        ray.wait(refs + senders, num_returns=len(refs) + len(senders))
        errors = []  # (from a sender, error), workers' first
        for i, ref in enumerate(refs + senders):
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                errors.append((i >= len(refs), e))
        dead = [(sender, e) for sender, e in errors if isinstance(e, ray.exceptions.RayActorError)]
        if dead and not dead[0][0]:
            raise dead[0][1]
        if dead:  # a dead sender: the workers' receives failed only because its sockets closed
            raise SenderLost("the learner was lost during a weight broadcast") from dead[0][1]
        if errors:
            raise errors[-1][1]  # the last: a sender's error says more than its receivers'
        return ray.get(refs)[-self.num_workers:] if refs else []

    def weight_versions(self) -> list[int]:
        return ray.get([w.weight_version.remote() for w in self.workers])

    def join_broadcast(self, master_addr: str, master_port: int, backend: str = "gloo",
                       timeout_s: float = 600.0) -> list:
        """Starts every worker's rendezvous (ranks 1..N); returns refs to wait on after rank 0 joins."""
        world = self.num_workers + 1
        return [w.join_broadcast.remote(master_addr, master_port, r + 1, world, backend, timeout_s)
                for r, w in enumerate(self.workers)]

    def receive_broadcast(self, spec: list[TensorSpec], version: int, bucket_bytes: int = 64 << 20,
                          senders: list | None = None, wait: bool = True) -> list[int]:
        """Broadcast sync, the workers' side: each worker receives `version` after the generate calls it
        already has. senders: the learner's send calls, whose errors come back with the workers'.
        wait=False returns at once, like sync_weights; the next `collect` waits and raises errors."""
        self._pending_syncs.extend(w.receive_broadcast.remote(spec, version, bucket_bytes) for w in self.workers)
        self._pending_senders.extend(senders or [])
        return self.wait_syncs() if wait else []

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
