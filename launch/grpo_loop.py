"""`dsarl grpo`: the GRPO loop on Ray (DESIGN.md section 4).

    driver: prompts (Arrow rows) -> RolloutPool (G samples each) -> RewardPool (components + total)
            -> group advantages -> LearnerActor.update -> the new weights (sync.method: one ray.put, or a
            gloo/NCCL broadcast from learner rank 0) -> every rollout worker loads them (version v+1)
            -> metrics.jsonl, rollouts/step_N.parquet, checkpoints.
Every step's prompts and sampling seeds derive from (seed, step), so `--resume` continues exactly.
"""
import contextlib
import dataclasses
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from tqdm import tqdm

from dsarl.actors.engine.sampling import SamplingParams
from dsarl.actors.learner_actor import resume_checkpoint
from dsarl.actors.learner_group import LearnerGroup
from dsarl.actors.placement import ResourceSpec, create_placement_group
from dsarl.actors.reward_workers import RewardPool
from dsarl.actors.rollout_workers import RolloutPool, sampler_dtype
from dsarl.actors.weight_sync import SYNC_METHODS, SenderLost, choose_backend
from dsarl.data.rollout_schema import completions_to_table, write_rollouts
from dsarl.data.tasks import make_rows
from dsarl.data.step_types import ScoredRound
from dsarl.learner.group_building import build_groups, enough_informative, flatten_rounds
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.learner.metrics import MetricsLogger
from dsarl.models import load_tokenizer
from dsarl.models.config import ConfigError, DSAConfig
from dsarl.rewards.config import RewardComponentConfig, RewardConfig
from dsarl.rewards.types import RewardSample

from .prompt_tokens import OverlongPolicy, fit_to_context, prompt_ids_for, prompt_token_limit
from .ray_setup import RayConfig, init_ray, start_together
from .step_metrics import is_correct, merge_reward_metrics, present_means, rollout_timing

logger = logging.getLogger(__name__)


@dataclass
class PromptData:
    # A dataset (data/datasets.py load_rows): a Parquet / JSONL / JSON / CSV file, a directory of them, a
    # datasets save_to_disk directory, or a `datasets.load_dataset` name. Every column reaches the rewards
    # as sample.row. None: the synthetic `task`.
    path: str | None = None
    prompt_key: str = "prompt"  # the prompt column: text, or a list of {role, content} messages
    answer_key: str | None = None  # the reference column, copied to row["answer"] (None: an `answer` column
    #                               or a chat's final assistant message, if any)
    split: str = "train"  # the split of a directory or a datasets name (a single file is one split)
    subset: str | None = None  # a datasets name's config (load_dataset(path, subset))
    limit: int | None = None  # use only the first `limit` rows of path (None: all)
    task: str | None = "arithmetic"  # a synthetic task from dsarl.data.tasks
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    num_train: int = 2048
    num_test: int = 128  # held-out rows for eval (task only; from a dataset: test_path / test_split)
    test_path: str | None = None  # eval rows (same keys as path); None: test_split of path, if set
    test_split: str | None = None  # eval rows from this split of path (with test_path: of test_path)
    # raw: bos + prompt text; chat: the tokenizer's chat template (add_generation_prompt) around a text prompt
    # as one user message. A message-list prompt always goes through the chat template.
    prompt_format: Literal["raw", "chat"] = "raw"
    # A prompt longer than the model's max_position_embeddings - rollout.max_new_tokens: error (at load,
    # naming the file and row), skip the row, or truncate it to its last tokens (launch/prompt_tokens.py);
    # skipped and truncated rows are counted in data/overlong_skipped, data/overlong_truncated.
    overlong: OverlongPolicy = "error"


@dataclass
class RolloutConfig:
    num_workers: int = 1
    num_cpus_per_worker: float = 0.5
    num_gpus_per_worker: float = 0.0
    num_threads: int = 0  # torch threads per worker (0: torch default)
    engine: Literal["native", "vllm"] = "native"
    # The sampler's weight dtype (vLLM's `dtype`); auto: the checkpoint's torch_dtype. bfloat16 is what
    # production samplers run: half the weight bytes, and bf16 matmuls (on a CPU with AVX512-BF16 about
    # 4x fp32's throughput; the KV cache stays fp32 on a CPU). The learner keeps its own precision
    # (learner.fsdp.mixed_precision); the sampler/learner mismatch this adds is what the off-policy
    # masking and TIS see (sampler log-probs).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_batch_size: int = 64
    temperature: float = 1.0  # the one temperature: the learner's log-probs are of this distribution
    top_p: float = 1.0
    top_k: int = 0
    # Truncated sampling (top_p < 1 or top_k > 0) is only exact when the learner renormalises over the
    # sampler's kept set (learner.keep_sampling_mask, native engine). Without it the learner's pi is
    # the untruncated distribution; set this to accept that (metrics then carry
    # sampling/unmasked_truncation = 1).
    allow_unmasked_truncation: bool = False
    max_new_tokens: int = 16
    stop_strings: list[str] = field(default_factory=list)
    # Asynchronous rollouts: workers generate the next max_staleness steps' samples while the learner
    # trains, so a batch is at most this many weight versions old (0: generate, then learn, in turn).
    # The learner's off-policy masking and TIS use the sampler's own log-probs, which makes it safe.
    max_staleness: int = 0
    # Partial rollouts (needs max_staleness >= 1 and the native engine): a weight sync reaches a generation
    # in flight, which continues on the new weights from its next step (the KV so far recomputed with
    # them); every token records the version that sampled it. A sample is as stale as its oldest token.
    partial_rollouts: bool = False


@dataclass
class FaultToleranceConfig:
    # A rollout worker lost mid-step (its process died): Ray restarts it (up to actor_max_restarts times
    # over the run), it reloads the current weights and the step's rollouts are generated again, with
    # the same seeds, up to max_step_retries times per step; then the run stops saying how to resume.
    max_step_retries: int = 2
    actor_max_restarts: int = 3
    # A lost learner rank: rebuild the learner group from the last checkpoint and redo the steps since
    # (metrics.jsonl is rewound), at most max_learner_restarts times; off: stop with how to resume.
    restart_from_checkpoint: bool = False
    max_learner_restarts: int = 2
    # Steps in a row whose every group was dropped because no reward worker could score it (workers lost
    # on every retry): the run stops (RewardWorkersLost) instead of training on nothing for ever.
    max_unscored_steps: int = 3


@dataclass
class SyncConfig:
    # How each update's weights reach the rollout workers (actors/weight_sync.py). object_store: learner
    # rank 0 puts its state dict in Ray's object store once and every worker reads it. broadcast: a gloo
    # (CPU) or NCCL (GPU) group of learner rank 0 and the workers, one collective per bucket; the learner
    # streams its weights into the buckets, so it never holds a second full copy (native engine only).
    method: Literal["object_store", "broadcast"] = "object_store"
    bucket_mb: float = 64.0  # broadcast: MiB per collective (same-dtype tensors; a bigger one goes alone)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when the learner and workers have GPUs
    timeout_s: float = 600.0  # broadcast: a rank waiting longer in a collective fails the sync

    def __post_init__(self) -> None:
        if self.method not in SYNC_METHODS:  # Literal is checked at load; this also catches code-built configs
            raise ValueError(f"sync.method must be one of {sorted(SYNC_METHODS)}, got {self.method!r}")
        if not self.bucket_mb > 0:
            raise ValueError(f"sync.bucket_mb must be > 0, got {self.bucket_mb}")
        if not self.timeout_s > 0:
            raise ValueError(f"sync.timeout_s must be > 0, got {self.timeout_s}")


def default_rewards() -> RewardConfig:
    return RewardConfig(components=[RewardComponentConfig(name="math_answer", weight=1.0)], num_cpus_per_worker=0.25)


@dataclass
class GRPOConfig:
    init_from: str = "runs/pretrain-tiny/final"  # the policy (and reference) checkpoint
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {attention: sparse, index_topk: 256}
    data: PromptData = field(default_factory=PromptData)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=default_rewards)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    # learner actors forming one torch.distributed group; N > 1 shards parameters, gradients and AdamW state
    # with FSDP2 (options: learner.fsdp)
    learner_ranks: int = 1
    learner_num_cpus: float = 1.0
    learner_num_gpus: float = 0.0
    learner_num_threads: int = 0
    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8  # G samples per prompt
    std_normalize: bool = False  # DeepSeek-V3.2: no std normalisation of advantages
    filter_uniform_groups: bool = False  # drop groups whose rewards are all equal (no signal)
    resample_rounds: int = 0  # with filtering: extra rollout rounds to refill the batch
    accuracy_component: str = "math_answer"  # reward component whose value > 0.5 counts as correct
    eval_every: int = 0  # 0: eval only before the first and after the last step
    eval_samples: int = 128
    save_every: int = 10
    keep_checkpoints: int = 2
    write_rollouts: bool = True
    seed: int = 0
    run_dir: str = "runs/grpo"
    ray_num_cpus: int | None = None  # embedded Ray's CPUs (None: all)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    placement_timeout_s: float = 120.0  # give up (with what is missing) instead of waiting forever
    tensorboard: bool = True  # metrics.jsonl is always written; TensorBoard events too by default
    wandb_project: str | None = None  # also log to Weights & Biases (pip install wandb)
    mlflow_experiment: str | None = None  # also log to MLflow (pip install mlflow)
    config_path: str | None = None

    def __post_init__(self) -> None:
        ro, lr = self.rollout, self.learner
        if lr.temperature is not None and lr.temperature != ro.temperature:
            raise ValueError(f"learner.temperature ({lr.temperature}) differs from rollout.temperature "
                             f"({ro.temperature}): the learner's log-probs must be those of the distribution the "
                             f"sampler drew from; set rollout.temperature only")
        if ro.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {ro.max_staleness}")
        if self.learner_ranks > 1 and lr.train_indexer:
            raise ValueError(f"learner.train_indexer runs on one learner rank only (the indexer's KL reads its "
                             f"parameters outside the sharded model's forward); learner_ranks is {self.learner_ranks}")
        if ro.partial_rollouts and (ro.max_staleness < 1 or ro.engine != "native"):
            raise ValueError(f"rollout.partial_rollouts needs rollout.max_staleness >= 1 (got {ro.max_staleness}) "
                             f"and rollout.engine 'native' (got {ro.engine!r}): with max_staleness 0 no generation "
                             f"runs during a weight sync, and only the native engine swaps weights mid-generation")
        if ro.partial_rollouts and self.sync.method == "broadcast":
            raise ValueError("rollout.partial_rollouts needs sync.method: object_store (a broadcast is received "
                             "between generate calls, so it cannot reach a generation in flight)")
        if self.unmasked_truncation and not ro.allow_unmasked_truncation:
            why = ("engine 'vllm' returns no keep mask" if ro.engine == "vllm"
                   else "learner.keep_sampling_mask is false")
            raise ValueError(f"rollout.top_p={ro.top_p} / rollout.top_k={ro.top_k} truncate sampling, but {why}: "
                             f"the learner would score tokens under the untruncated distribution. Use top_p: 1.0 "
                             f"and top_k: 0, or set rollout.allow_unmasked_truncation: true to accept the mismatch")

    @property
    def unmasked_truncation(self) -> bool:
        """Truncated sampling whose keep mask the learner will not see."""
        ro = self.rollout
        truncated = ro.top_p < 1.0 or ro.top_k > 0
        return truncated and (ro.engine == "vllm" or not self.learner.keep_sampling_mask)


def load_prompt_rows(data: PromptData, seed: int, resolve) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows): each with `prompt` (text or messages) and, where there is one, `answer` from
    data.prompt_key / data.answer_key (data/prompts.py), every other column kept."""
    if data.path is not None:
        from dsarl.data.prompts import load_prompts

        def rows(source: str, split: str, limit: int | None) -> list[dict]:
            return load_prompts(source, resolve, data.prompt_key, data.answer_key, split, limit, data.subset)

        train = rows(data.path, data.split, data.limit)
        test = []
        if data.test_path is not None or data.test_split is not None:
            test = rows(data.test_path or data.path, data.test_split or data.split, None)
        return train, test
    train = make_rows(data.task, data.num_train, seed, "train", **data.task_kwargs)
    test = make_rows(data.task, data.num_test, seed, "test", **data.task_kwargs)
    train_prompts = {r["prompt"] for r in train}
    return train, [r for r in test if r["prompt"] not in train_prompts]  # held out: never trained on


def fit_prompt_rows(data: PromptData, train: list[dict], test: list[dict], tokenizer,
                    limit: int) -> tuple[list[dict], list[dict], dict[str, float]]:
    """load_prompt_rows' rows under data.overlong (launch/prompt_tokens.py): (train, test, counts of the train
    rows skipped or truncated). Raises ValueError for an overlong row under "error", or no train rows left."""
    train_source = data.path or f"data.task {data.task!r} (train)"
    test_source = (data.test_path or (data.path and f"{data.path} (split {data.test_split})")
                   or f"data.task {data.task!r} (test)")
    fitted = []
    for rows, source in ((train, train_source), (test, test_source)):
        kept, over = fit_to_context(rows, prompt_ids_for(rows, tokenizer, data.prompt_format), limit, data.overlong,
                                    source)
        if over:
            logger.warning("%s: %d prompt(s) longer than %d tokens %s (data.overlong)", source, over, limit,
                           "skipped" if data.overlong == "skip" else "truncated to their last tokens")
        fitted.append((kept, over))
    if not fitted[0][0]:
        raise ValueError(f"{train_source}: no prompt rows to train on"
                         + (f" ({fitted[0][1]} skipped as longer than {limit} tokens)" if fitted[0][1] else ""))
    over = float(fitted[0][1])
    return fitted[0][0], fitted[1][0], {"data/overlong_skipped": over if data.overlong == "skip" else 0.0,
                                        "data/overlong_truncated": over if data.overlong == "truncate" else 0.0}


def alive_nodes() -> dict[str, str]:
    """node id -> IP of every live Ray node."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


class LearnerLost(RuntimeError):
    """A learner rank's process died during a step."""


class RewardWorkersLost(RuntimeError):
    """Reward workers were lost on every retry for fault_tolerance.max_unscored_steps steps in a row."""


@dataclass
class PendingRound:
    """A rollout round submitted to the workers and not yet collected."""
    rows: list[dict]
    refs: list  # the workers' generate() results
    submitted: float  # perf_counter() at submission


def batch_staleness(groups, learner_version: int) -> tuple[list[int], int]:
    """(per sample, how many versions its weights are behind the learner's; how many samples span more
    than one version). A partial rollout's `weight_versions` entry is its oldest token's version
    (data/step_types.py): a sample partly sampled with older weights is as stale as its oldest token, so
    the max_staleness bound holds for every token of the batch."""
    staleness = [learner_version - v for g in groups for v in g.weight_versions]
    partial = sum(len(set(tv)) > 1 for g in groups for tv in (g.token_versions or []) if tv)
    return staleness, partial


class GRPOTrainer:
    """Wires the pools and the learner; `step()` is one GRPO step. Thin: the maths lives in learner/."""

    def __init__(self, cfg: GRPOConfig, resume: bool | str = False, resolve=lambda p: p):
        """resume: False, True (the newest complete checkpoint in run_dir) or a checkpoint directory."""
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        ckpt = resume if isinstance(resume, str) else resume_checkpoint(cfg.run_dir) if resume else None
        if resume and ckpt is None:
            raise ConfigError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        if ckpt is not None and not (Path(ckpt) / "trainer_state.json").is_file():
            raise ConfigError(f"--resume {ckpt}: not a complete training checkpoint (no trainer_state.json)")
        self._bar = None  # the progress bar while fit() runs
        self._reward_failures = 0.0
        self._queue: deque[PendingRound] = deque()  # submitted, not yet collected rounds (oldest first)
        self._unscored_steps = 0  # steps in a row with every group unscored (reward workers lost)
        self._actor_failures = 0  # rollout workers lost and restarted over the run
        self._perf_to_wall = time.time() - time.perf_counter()
        self._learn_windows: list[tuple[float, float]] = []  # wall-clock (start, end) of recent updates
        init_ray(RayConfig(num_cpus=cfg.ray_num_cpus, include_dashboard=False))
        self._nodes_at_start = alive_nodes()  # a stop names the nodes lost since
        init = resolve(cfg.init_from)
        self.tokenizer = load_tokenizer(init)
        ro = cfg.rollout
        self.train_rows, self.test_rows = load_prompt_rows(cfg.data, cfg.seed, resolve)
        limit = prompt_token_limit(init, cfg.model_overrides, ro.max_new_tokens)
        self.train_rows, self.test_rows, self.data_metrics = fit_prompt_rows(
            cfg.data, self.train_rows, self.test_rows, self.tokenizer, limit)
        self.prompt_limit = limit if cfg.data.overlong == "truncate" else None  # left truncation at generation
        # One placement group for every actor: a config the cluster cannot hold fails here, naming what
        # is missing, instead of leaving actors pending forever.
        self.placement = create_placement_group([
            ResourceSpec("rollout", ro.num_workers, ro.num_cpus_per_worker, ro.num_gpus_per_worker),
            ResourceSpec("reward", cfg.rewards.num_workers, cfg.rewards.num_cpus_per_worker, 0.0),
            ResourceSpec("learner", cfg.learner_ranks, cfg.learner_num_cpus, cfg.learner_num_gpus),
        ], cfg.placement_strategy, cfg.placement_timeout_s)
        try:
            self._start_actors(ckpt, init)
        except BaseException:
            self.shutdown()  # what started, stops: a later trainer in this process finds its CPUs free
            raise

    def _start_actors(self, ckpt: str | None, init: str) -> None:
        cfg, ro = self.cfg, self.cfg.rollout
        bundle = lambda role: (lambda i: self.placement.actor_options(role, i))  # noqa: E731
        learner_cfg = dataclasses.replace(cfg.learner, temperature=ro.temperature)  # one temperature
        self._make_learner = lambda resume_from: LearnerGroup(  # noqa: E731  (also a restart's)
            cfg.learner_ranks, init, learner_cfg, cfg.seed, cfg.learner_num_cpus, cfg.learner_num_gpus,
            cfg.learner_num_threads, resume_from, cfg.model_overrides, placement=bundle("learner"),
            total_updates=cfg.steps)
        dtype_kwargs, rollout_overrides = sampler_dtype(ro.engine, ro.dtype, cfg.model_overrides)
        started, error = start_together(
            learner=lambda: self._make_learner(ckpt),
            rollout=lambda: RolloutPool(ro.num_workers, ckpt or init, num_cpus_per_worker=ro.num_cpus_per_worker,
                                        num_gpus_per_worker=ro.num_gpus_per_worker, engine=ro.engine,
                                        engine_kwargs={"max_batch_size": ro.max_batch_size, **dtype_kwargs},
                                        num_threads=ro.num_threads, model_overrides=rollout_overrides,
                                        placement=bundle("rollout"),
                                        max_restarts=cfg.fault_tolerance.actor_max_restarts,
                                        partial_rollouts=ro.partial_rollouts),
            rewards=lambda: RewardPool(cfg.rewards, placement=bundle("reward")))
        self.learner, self.rollout, self.rewards = (started.get(k) for k in ("learner", "rollout", "rewards"))
        if error is not None:
            raise error  # __init__ stops what did start
        sc, backend = cfg.sync, choose_backend(cfg.sync.backend, cfg.learner_num_gpus, ro.num_gpus_per_worker)
        self._make_sync = lambda: SYNC_METHODS[sc.method](  # noqa: E731  (also a learner restart's)
            self.learner, self.rollout, backend=backend, bucket_bytes=int(sc.bucket_mb * (1 << 20)),
            timeout_s=sc.timeout_s)
        self.start_step = 0
        if ckpt is not None:
            from dsarl.learner.checkpointing import load_training_state

            self.start_step = load_training_state(ckpt)["step"]
        self.sync = self._make_sync()
        self.sync.connect()  # broadcast: the group forms now, before any generation is queued on the workers
        self._version = self.learner.weight_version()
        if ckpt is not None:
            self._version = self.sync.publish()
            self.sync.deliver(self._version)
        self._learner_restarts = 0
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                    mlflow_experiment=cfg.mlflow_experiment,
                                    resume_step=self.start_step if ckpt else None)
        model_cfg = DSAConfig.from_file(Path(init) / "config.json").replace(**cfg.model_overrides)
        self.record_indices = model_cfg.attention == "sparse" and cfg.learner.use_sampler_indices
        self.record_keep = cfg.learner.keep_sampling_mask and (ro.top_p < 1.0 or ro.top_k > 0)
        # MoE routing: recorded for replay, and with the native engine also with replay off, where the
        # learner reports how often its own routing differs from the sampler's (vLLM cannot record it)
        has_moe = "sparse" in model_cfg.layer_mlp_types
        self.record_experts = has_moe and (cfg.learner.use_sampler_experts or ro.engine == "native")

    def sampling(self, step: int, n: int, greedy: bool = False) -> SamplingParams:
        ro = self.cfg.rollout
        return SamplingParams(temperature=0.0 if greedy else ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                              max_new_tokens=ro.max_new_tokens, stop_strings=list(ro.stop_strings), n=n,
                              seed=self.cfg.seed * 1_000_003 + step,
                              return_keep_mask=self.record_keep and not greedy,
                              return_indices=self.record_indices and not greedy,
                              return_experts=self.record_experts and not greedy)

    def _prompt_text(self, row: dict, completion) -> str:
        """The prompt as the policy saw it: the text, or a chat's messages rendered by the template."""
        prompt = row["prompt"]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(completion.prompt_ids, skip_special=False)

    def _score(self, rows, completions):
        samples = [RewardSample(prompt=self._prompt_text(rows[c.prompt_index], c), completion=c.text,
                                num_tokens=len(c.token_ids),
                                row=rows[c.prompt_index], group_id=c.prompt_index, sample_index=c.sample_index,
                                completion_ids=list(c.token_ids),
                                finish_reason=c.finish_reason) for c in completions]
        return self.rewards.score(samples)

    def evaluate(self, step: int) -> dict[str, float]:
        rows = self.test_rows[: self.cfg.eval_samples]
        if not rows:
            return {}
        comps = self.rollout.generate(prompt_ids_for(rows, self.tokenizer, self.cfg.data.prompt_format,
                                                     self.prompt_limit),
                                      self.sampling(step, 1, greedy=True))
        scores, rmetrics = self._score(rows, comps)
        scores = [s for s in scores if s is not None]  # a lost reward worker's samples: no value to average
        key = self.cfg.accuracy_component
        return {"eval/accuracy": sum(is_correct(s, key) for s in scores) / len(scores) if scores else float("nan"),
                "eval/reward": sum(s["total"] for s in scores) / len(scores) if scores else float("nan"),
                "eval/unscored_samples": rmetrics["reward/unscored_samples"],
                "eval/prompts": len(scores)}  # the accuracy's denominator: its binomial noise is ~sqrt(p(1-p)/n)

    def _phase(self, name: str) -> None:
        """Shows what the step is doing now, with the run's reward failures so far."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name}, reward failures {self._reward_failures:.0f}", refresh=True)

    def _submit_round(self, step: int, round_idx: int) -> PendingRound:
        """Starts generating one round's samples with the weights the rollout workers hold when the
        call reaches them (every earlier weight sync first: Ray runs one caller's calls to an actor in
        order). Returns at once."""
        rng = random.Random(f"{self.cfg.seed}/grpo/{step}/{round_idx}")
        rows = rng.sample(self.train_rows, min(self.cfg.prompts_per_step, len(self.train_rows)))
        refs = self.rollout.submit_generate(prompt_ids_for(rows, self.tokenizer, self.cfg.data.prompt_format,
                                                           self.prompt_limit),
                                            self.sampling(step * 101 + round_idx, self.cfg.group_size))
        return PendingRound(rows, refs, time.perf_counter())

    def _collect_round(self, pending: PendingRound) -> ScoredRound:
        """Waits for a submitted round's samples and scores them."""
        self._phase("generate")
        comps = self.rollout.collect(pending.refs)
        t1 = time.perf_counter()
        self._phase("reward")
        scores, rmetrics = self._score(pending.rows, comps)
        self._reward_failures += rmetrics.get("reward/failures", 0.0)
        return ScoredRound(pending.rows, comps, scores, rmetrics, t1 - pending.submitted, time.perf_counter() - t1)

    def _rollout_round(self, step: int, round_idx: int) -> ScoredRound:
        return self._collect_round(self._submit_round(step, round_idx))

    def _fill_queue(self, step: int) -> None:
        """Keeps rounds for steps step .. step + max_staleness generating (only step's when it is 0)."""
        depth = self.cfg.rollout.max_staleness + 1
        while len(self._queue) < depth and step + len(self._queue) < self.cfg.steps:
            self._queue.append(self._submit_round(step + len(self._queue), 0))

    def _check_unscored(self, step: int, groups, gmetrics: dict) -> None:
        """Counts steps left with no group because every one was unscored; stops at the configured count."""
        if groups or not gmetrics.get("groups/dropped_unscored", 0.0):
            self._unscored_steps = 0
            return
        self._unscored_steps += 1
        limit = self.cfg.fault_tolerance.max_unscored_steps
        if self._unscored_steps >= limit:
            raise RewardWorkersLost(
                f"step {step + 1}: no sample scored for {self._unscored_steps} step(s) in a row: the reward workers "
                f"were lost on every retry (fault_tolerance.max_unscored_steps={limit}); see the reward workers' "
                f"logs, then resume with --resume")

    def step(self, step: int) -> dict[str, float]:
        """One GRPO step: its first round (submitted up to max_staleness steps ago), dynamic-sampling
        rounds with the current weights, the learner's update, the weight sync."""
        cfg, G = self.cfg, self.cfg.group_size
        t_start = time.perf_counter()
        rounds = self._rollout_phase(step)
        groups, gmetrics = build_groups(rounds, G, cfg.prompts_per_step, cfg.std_normalize,
                                        cfg.filter_uniform_groups, self.record_keep, self.record_indices)
        self._check_unscored(step, groups, gmetrics)
        staleness, partial = batch_staleness(groups, self._version)
        assert max(staleness, default=0) <= cfg.rollout.max_staleness, f"batch too stale: {max(staleness)}"
        self._phase("learn")
        t2 = time.perf_counter()
        with self._learner_collective(f"step {step + 1}"):
            lmetrics = self.learner.update(groups) if groups else {}
        t3 = time.perf_counter()
        self._phase("sync")
        with self._learner_collective(f"step {step + 1}"):
            self._version = self.sync.publish()  # gathers the FSDP shards: a collective over every rank
        try:
            self.sync.deliver(self._version, wait=cfg.rollout.max_staleness == 0)
        except SenderLost as e:
            raise LearnerLost(f"step {step + 1}") from e.__cause__
        except ray.exceptions.RayActorError as e:  # the update is done: reload the weights, don't redo it
            self._recover_rollouts(step, e)
        t4 = time.perf_counter()
        self._fill_queue(step + 1)  # the next rounds start on the new weights before this step's bookkeeping
        rows, comps, scores = flatten_rounds(rounds)
        if cfg.write_rollouts:
            self._write_rollouts(step + 1, rows, comps, scores)
        n_tokens = sum(len(c.token_ids) for c in comps)
        t_gen, t_rew = sum(r.generate_s for r in rounds), sum(r.reward_s for r in rounds)
        scored = [s for s in scores if s is not None]  # unscored samples (a lost reward worker) have no value
        correct = [is_correct(s, cfg.accuracy_component) for s in scored]
        self._learn_windows = [*self._learn_windows[-7:], (self._wall_offset(t2), self._wall_offset(t3))]
        busy = self.rollout.pop_busy()  # per worker: (start, end) of each generate call finished since the last step
        wall = time.perf_counter() - t_start
        metrics = {
            "accuracy": sum(correct) / len(correct) if correct else float("nan"), **gmetrics, **self.data_metrics,
            **present_means(scored, prefix="reward/"),
            **merge_reward_metrics([r.reward_metrics for r in rounds]),
            "response_length/mean": n_tokens / len(comps),
            "response_length/clip_frac": sum(c.finish_reason == "length" for c in comps) / len(comps),
            **{("kl" if k == "kl_mean" else k): v for k, v in lmetrics.items()},
            "weight_version": self._version, "tokens_per_s": n_tokens / max(t_gen, 1e-9),
            "staleness/max": float(max(staleness, default=0)),
            "staleness/mean": sum(staleness) / max(len(staleness), 1),
            **({"staleness/partial_samples": float(partial)} if cfg.rollout.partial_rollouts else {}),
            **({"sampling/unmasked_truncation": 1.0} if cfg.unmasked_truncation else {}),
            "time/generate": t_gen, "time/reward": t_rew, "time/learn": t3 - t2, "time/sync": t4 - t3,
            **rollout_timing(busy, wall, self._learn_windows),
            "time/learner_idle": max(0.0, wall - (t3 - t2)),
        }
        return metrics

    def _rollout_rounds(self, step: int) -> list[ScoredRound]:
        cfg, G = self.cfg, self.cfg.group_size
        self._fill_queue(step)
        rounds = [self._collect_round(self._queue.popleft())]
        for r in range(1, cfg.resample_rounds + 1):  # refill with informative groups (DAPO dynamic sampling)
            if not cfg.filter_uniform_groups or enough_informative(rounds, G, cfg.prompts_per_step):
                break
            rounds.append(self._rollout_round(step, r))
        return rounds

    def _rollout_phase(self, step: int) -> list[ScoredRound]:
        """The step's scored rounds. A rollout worker lost on the way is restarted with the current
        weights and the rounds are generated again: their seeds derive from (seed, step), so the retried
        step samples exactly what the lost one would have."""
        retries = self.cfg.fault_tolerance.max_step_retries
        for attempt in range(retries + 1):
            try:
                return self._rollout_rounds(step)
            except ray.exceptions.RayActorError as e:
                if attempt == retries:
                    raise self._stopping(step, f"rollout workers lost {retries + 1} times ({e})") from e
                self._recover_rollouts(step, e)
        raise AssertionError("unreachable")

    def _recover_rollouts(self, step: int, error: Exception) -> None:
        cause = str(error).splitlines()[0]
        if self.cfg.fault_tolerance.max_step_retries == 0:  # no restarts asked: stop now, as the rollout phase does
            raise self._stopping(step, f"a rollout worker was lost ({cause})") from error
        logger.warning("step %d: a rollout worker was lost (%s); restarting it with weight version %d",
                       step + 1, cause, self._version)
        self._phase("restarting a rollout worker")
        self._queue.clear()  # rounds submitted to the lost worker are generated again
        try:
            self.sync.restore(self._version)
        except ray.exceptions.RayActorError as e:  # it could not come back (its node is gone, nothing to take it)
            lost = str(e).splitlines()[0]
            raise self._stopping(step, f"a lost rollout worker could not be restarted ({lost})") from e
        self._actor_failures += 1

    def _stopping(self, step: int, what: str) -> RuntimeError:
        """The error a run stops with when its rollout workers cannot go on: what happened, the Ray nodes
        lost, and how to continue."""
        return RuntimeError(f"step {step + 1}: {what}{self._nodes_lost()}; stopping. Continue with --resume "
                            "(from the last checkpoint)")

    @contextlib.contextmanager
    def _learner_collective(self, what: str):
        """Around every call that is a collective over the learner ranks (update, weight gather, checkpoint
        save, final export): a lost rank shows up either as its own death or as a survivor's failed
        collective (gloo: "connection reset by peer"), whichever ray.get meets first; both raise
        LearnerLost (the Ray error as its cause), any other error passes unchanged."""
        try:
            yield
        except ray.exceptions.RayError as e:
            if isinstance(e, ray.exceptions.RayActorError) or self._a_learner_rank_died():
                raise LearnerLost(what) from e
            raise

    def _a_learner_rank_died(self, grace_s: float = 20.0) -> bool:
        """Whether a learner rank is dead. A survivor's collective can fail before its peer's process is
        gone (a removed node's raylet dies first, its workers a moment later), so with several ranks this
        asks again for up to grace_s before calling the error the survivor's own."""
        deadline = time.monotonic() + (grace_s if len(self.learner.ranks) > 1 else 0.0)
        while True:
            for rank in self.learner.ranks:
                try:
                    ray.get(rank.pid.remote(), timeout=60)
                except ray.exceptions.RayActorError:
                    return True
                except ray.exceptions.GetTimeoutError:
                    continue  # alive but still busy (a survivor blocked in a collective): not lost itself
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)

    def _nodes_lost(self, wait_s: float = 25.0) -> str:
        """', Ray node(s) down: ID (IP), ...' for nodes alive when the trainer started and dead now. Ray marks
        a node dead only after its health checks fail (~17 s here), so on a multi-node cluster this waits up to
        wait_s for that before saying no node was lost; on one node (the driver's) nothing else can die."""
        if len(self._nodes_at_start) < 2:
            return ""
        deadline = time.monotonic() + wait_s
        while True:
            now = alive_nodes()
            gone = [f"{node_id} ({ip})" for node_id, ip in self._nodes_at_start.items() if node_id not in now]
            if gone or time.monotonic() > deadline:
                return f", Ray node(s) down: {', '.join(gone)}" if gone else ""
            time.sleep(0.5)

    def _restart_learner(self, error: Exception) -> int:
        """A learner rank was lost: a new learner group from the last checkpoint (the initial weights if
        none). Returns the step to continue from; metrics after it are dropped."""
        ft = self.cfg.fault_tolerance
        if not ft.restart_from_checkpoint or self._learner_restarts >= ft.max_learner_restarts:
            raise RuntimeError(f"a learner rank was lost ({str(error).splitlines()[0]}){self._nodes_lost()}; "
                               "continue with --resume "
                               f"(from the last checkpoint in {self.run_dir / 'checkpoints'})") from error
        self._learner_restarts += 1
        ckpt = resume_checkpoint(self.cfg.run_dir)
        logger.warning("a learner rank was lost (%s); restarting the learner from %s", str(error).splitlines()[0],
                       ckpt or "the initial checkpoint")
        self._phase("restarting the learner")
        self.learner.shutdown()
        self.learner = self._make_learner(ckpt)
        step = 0
        if ckpt is not None:
            from dsarl.learner.checkpointing import load_training_state

            step = load_training_state(ckpt)["step"]
        self._queue.clear()
        self.sync = self._make_sync()
        self._version = self.sync.publish()
        self.sync.restore(self._version)
        self.logger.rewind(step)
        return step

    def _wall_offset(self, perf: float) -> float:
        """A perf_counter reading as wall-clock time (the workers report time.time())."""
        return perf + self._perf_to_wall

    def _write_rollouts(self, step: int, rows, comps, scores) -> None:
        meta = [{k: v for k, v in rows[c.prompt_index].items() if k != "prompt"} for c in comps]
        table = completions_to_table(
            comps, prompt_ids=[str(rows[c.prompt_index].get("id", c.prompt_index)) for c in comps],
            group_ids=[f"{step}-{c.prompt_index}" for c in comps], metadata=meta,
            reward_components=[None if s is None else {k: v for k, v in s.items() if k != "total"} for s in scores],
            rewards=[None if s is None else s["total"] for s in scores],
            reward_failed=[s is None for s in scores])  # None: unscored (its reward worker was lost)
        path = self.run_dir / "rollouts" / f"step_{step:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rollouts(table, path)

    def fit(self, show_progress: bool = True) -> Path:
        """Trains to cfg.steps. An error (a dead reward component, a lost actor) stops every actor of
        this trainer and propagates: the run ends non-zero and `--resume` continues from the last
        checkpoint."""
        try:
            return self._fit(show_progress)
        finally:
            self.shutdown()

    def _fit(self, show_progress: bool) -> Path:
        cfg = self.cfg
        self._bar = bar = tqdm(total=cfg.steps, initial=self.start_step, desc="grpo", disable=not show_progress)
        if self.start_step == 0:
            self._phase(f"initial eval ({min(len(self.test_rows), cfg.eval_samples)} prompts)")
            self.logger.log(0, self.evaluate(0))
        step = self.start_step
        while step < cfg.steps:
            t0 = time.perf_counter()
            try:
                metrics = self.step(step)
            except (LearnerLost, SenderLost) as e:  # SenderLost: found by a later step's collect (async rollouts)
                step = self._restart_learner(e.__cause__ or e)
                bar.n = step
                continue
            done = step + 1
            step = done
            metrics["faults/rollout_restarts"] = float(self._actor_failures)
            metrics["faults/learner_restarts"] = float(self._learner_restarts)
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                self._phase("eval")
                metrics.update(self.evaluate(done))
            metrics["time/step"] = time.perf_counter() - t0
            self.logger.log(done, metrics)
            bar.update(1)
            bar.set_postfix_str(f"reward {metrics['reward/mean']:.3f}, acc {metrics['accuracy']:.2f}, "
                                f"reward failures {self._reward_failures:.0f}")
            if done % cfg.save_every == 0 or done == cfg.steps:
                self._phase("checkpoint")
                try:
                    with self._learner_collective(f"checkpoint {done}"):
                        self.learner.save(str(self.run_dir), done, {"step": done}, cfg.keep_checkpoints)
                except LearnerLost as e:  # a rank lost after its update: this step is redone
                    step = self._restart_learner(e.__cause__)
                    bar.n = step
        bar.close()
        try:
            with self._learner_collective("final export"):
                final = self.learner.save_final(str(self.run_dir / "final"))
        except LearnerLost as e:
            self._restart_learner(e.__cause__)  # from the last checkpoint, which is the last step's: export again
            final = self.learner.save_final(str(self.run_dir / "final"))
        self.logger.close()
        return Path(final)

    def shutdown(self) -> None:
        """Stops this trainer's actors and frees its placement group (the Ray instance stays up)."""
        if self.placement is None:  # already shut down
            return
        if getattr(self, "learner", None) is not None:
            self.learner.shutdown()
        for pool in (getattr(self, "rollout", None), getattr(self, "rewards", None)):
            for w in pool.workers if pool is not None else []:
                ray.kill(w)
        self.placement.remove()
        self.placement = None


def run_grpo(cfg: GRPOConfig, resume: bool | str = False, resolve=lambda p: p, show_progress: bool = True) -> Path:
    return GRPOTrainer(cfg, resume, resolve).fit(show_progress)
