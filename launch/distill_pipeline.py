"""`dsarl distill CONFIG`: specialist distillation (DESIGN.md section 5, DSA.md 4.2) on a local Ray.

1. base        a checkpoint from the config, or `pretrain` on the `mixed` task: a `mixture` of every
               domain's pretraining document (data/domains.py Domain.pretrain_document)
2. specialists one GRPO run per domain from the base (data/domains.py gives its task, reward mix and
               accuracy component), or an existing checkpoint per domain; their GRPO evals are kept
3. teachers    one pool of rollout workers per specialist (actors/teacher_pool.py)
4. student     starts from the base, trained in this process (launch/distill_student.py):
               a. SFT on specialist samples whose total reward beats a threshold (rejection
                  sampling), each batch mixed across domains by `sft_weight`
               b. on-policy distillation: the student samples prompts drawn by `opd_weight`, the
                  teacher(s) of each prompt's domain return their full log-distributions at the
                  student's tokens, the loss is the exact per-token reverse KL(student || teacher)
               either or both (a then b); `opd.sft_coef` keeps the SFT term inside b as well
               Rows per domain: train (specialists, SFT data, on-policy prompts), validation
               (`num_validation`: every choice: teachers, domain weights, on-policy steps kept) and
               held out (the report only); data/domains.py keeps them disjoint.
5. report      greedy held-out accuracy of base, each specialist and the student on every domain
               (the rows and rule of GRPOTrainer.evaluate), the choices and the validation
               accuracies they read: printed, report.md, accuracy.png, results.json in run_dir
               (launch/distill_report.py).
`seeds: [0, 1, 2]` runs all of it per seed (launch/distill_seeds.py); `deterministic: true` makes
one run bit-reproducible on one machine (README, Distillation).
With --resume a stage whose output already exists is not run again.
"""
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dsarl.actors.engine import NativeEngine
from dsarl.data.domains import DomainRows, get_domain, validation_rows
from dsarl.learner.metrics import MetricsLogger, read_metrics
from dsarl.learner.optim import OptimConfig
from dsarl.learner.pretrain import PretrainConfig
from dsarl.rewards.config import RewardConfig
from dsarl.rewards.types import RewardSample

from .distill_report import write_report
from .distill_student import evaluate, train_student
from .grpo_loop import GRPOConfig, load_prompt_rows
from .ray_setup import RayConfig, init_ray, start_together


@dataclass
class DomainEntry:
    name: str = "math"  # a domain registered in dsarl.data.domains
    task_kwargs: dict = field(default_factory=dict)  # overrides of the registry's task kwargs
    checkpoint: str | None = None  # an existing specialist: its GRPO run is skipped
    grpo_overrides: list[str] = field(default_factory=list)  # dotlist on this specialist's GRPO config
    sft_weight: float = 1.0  # share of each SFT batch from this domain
    opd_weight: float = 1.0  # share of each on-policy batch's prompts from this domain


@dataclass
class TeacherConfig:
    num_workers: int = 1  # rollout workers per domain
    num_cpus_per_worker: float = 0.25
    max_batch_size: int = 64


@dataclass
class SFTConfig:
    enabled: bool = True
    prompts: int = 192  # specialist prompts over all domains (split by sft_weight)
    samples_per_prompt: int = 4
    temperature: float = 1.0
    reward_threshold: float = 0.5  # keep samples whose total reward is strictly above it
    min_samples: int = 16  # fewer kept samples over all domains: SFT is skipped (logged in the report)
    steps: int = 100
    batch_size: int = 32
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5, min_lr_ratio=0.1,
                                                                    weight_decay=0.0))


@dataclass
class OPDConfig:
    enabled: bool = True
    steps: int = 20
    prompts_per_step: int = 24  # split by opd_weight
    samples_per_prompt: int = 2
    temperature: float = 1.0  # the student's sampling temperature (the KL is at temperature 1)
    sft_coef: float = 0.0  # > 0 (with sft enabled): an SFT batch in every step too, with this weight
    # every choice below reads validation rows only (launch/distill_student.py, distill_select.py)
    teacher: Literal["own", "validation"] = "own"  # validation: per domain the specialists best on its rows
    teacher_margin: float = 0.0  # with validation: every specialist within this accuracy of the best (a mixture)
    weights: Literal["fixed", "validation_gap"] = "fixed"  # validation_gap: re-weight domains at each eval
    weight_floor: float = 0.1  # validation_gap: a domain's weight is floor + its gap to its teachers
    eval_every: int = 0  # validate the student every n steps (and before the first); 0: never
    keep_best: bool = True  # with eval_every: keep the best validated state, not the last
    patience: int = 0  # with eval_every: stop after this many evals without gain; 0: run every step
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=0, min_lr_ratio=1.0,
                                                                    weight_decay=0.0))


@dataclass
class DistillConfig:
    run_dir: str = "runs/distill"
    seed: int = 0
    base: str | None = None  # an existing base checkpoint; None: pretrain one
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    domains: list[DomainEntry] = field(default_factory=lambda: [DomainEntry(n) for n in ("math", "code", "retrieval")])
    specialist: GRPOConfig = field(default_factory=GRPOConfig)  # the GRPO template; each domain fills in its part
    teachers: TeacherConfig = field(default_factory=TeacherConfig)
    reward_num_cpus: float = 0.25  # per domain reward worker during distillation and eval
    sft: SFTConfig = field(default_factory=SFTConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    eval_samples: int = 128  # held-out rows per domain (the specialist GRPO evals use the same rows)
    num_validation: int = 64  # validation rows per domain, disjoint from train and held-out rows: the choices' rows
    seeds: list[int] = field(default_factory=list)  # non-empty: the pipeline per seed, in run_dir/seed<k> (seed unused)
    reuse_specialists: bool = False  # with seeds: later seeds take the first seed's base and specialists
    # bit-reproducible on one machine: fixed torch threads everywhere, deterministic torch algorithms,
    # synchronous specialist rollouts (README, Distillation). Costs the async overlap.
    deterministic: bool = False
    max_batch_size: int = 64  # the student's and the evaluator's generation batch
    num_threads: int = 0  # torch threads of this process (the student); 0: torch default
    ray_num_cpus: int | None = None
    tensorboard: bool = False
    config_path: str | None = None


# ---- configuration of the parts ----------------------------------------------------------------
def specialist_config(cfg: DistillConfig, entry: DomainEntry, base: str) -> GRPOConfig:
    """The template with the domain's task, reward mix, accuracy component and length, then overrides."""
    g = copy.deepcopy(cfg.specialist)
    f = get_domain(entry.name).grpo_fields(entry.task_kwargs)
    g.data.task, g.data.task_kwargs, g.data.path = f["task"], f["task_kwargs"], None
    g.rewards = RewardConfig(components=f["components"], timeout_s=f["timeout_s"],
                             num_workers=g.rewards.num_workers, num_cpus_per_worker=g.rewards.num_cpus_per_worker)
    g.accuracy_component = f["accuracy_component"]
    g.rollout.max_new_tokens = f["max_new_tokens"]
    g.init_from, g.run_dir, g.seed = base, str(Path(cfg.run_dir) / "specialists" / entry.name), cfg.seed
    g.eval_samples, g.ray_num_cpus, g.tensorboard = cfg.eval_samples, cfg.ray_num_cpus, cfg.tensorboard
    if entry.grpo_overrides:
        g = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(g), OmegaConf.from_dotlist(entry.grpo_overrides)))
    if cfg.deterministic:
        if g.rollout.max_staleness:  # async rollouts land in an order set by timing
            raise ValueError(f"deterministic: true needs synchronous specialist rollouts; the {entry.name} "
                             f"specialist has rollout.max_staleness {g.rollout.max_staleness}")
        g.rollout.num_threads = g.rollout.num_threads or 1  # a thread count fixed by the config, not the machine
        g.learner_num_threads = g.learner_num_threads or 1
    return g


def apply_determinism(cfg: DistillConfig) -> None:
    """This process's part of `deterministic: true` (the actors' threads come from their configs)."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(cfg.num_threads or 1)


@dataclass
class DomainData:
    """What the distillation needs of one domain: its rows, reward pool and accuracy rule."""

    name: str
    train: list[dict]
    validation: list[dict]  # the choices' rows (data/domains.py validation_rows)
    test: list[dict]  # held out: read for the report only
    rewards: object  # RewardPool
    accuracy_component: str
    max_new_tokens: int

    def score(self, rows: list[dict], completions) -> list[dict[str, float]]:
        samples = [RewardSample(prompt=rows[c.prompt_index]["prompt"], completion=c.text, num_tokens=len(c.token_ids),
                                row=rows[c.prompt_index], group_id=c.prompt_index, sample_index=c.sample_index,
                                finish_reason=c.finish_reason) for c in completions]
        return self.rewards.score(samples)[0]


def domain_rows(g: GRPOConfig, num_validation: int, resolve) -> DomainRows:
    """The specialist's own train and held-out rows (load_prompt_rows: what its GRPO run reads) and a
    validation split drawn apart from both; DomainRows asserts the three are disjoint."""
    train, test = load_prompt_rows(g.data, g.seed, resolve)
    return DomainRows(train, validation_rows(g.data.task, g.data.task_kwargs, num_validation, g.seed, train + test),
                      test)


def domain_data(g: GRPOConfig, name: str, reward_num_cpus: float, resolve, num_validation: int) -> DomainData:
    from dsarl.actors.reward_workers import RewardPool

    rows = domain_rows(g, num_validation, resolve)
    rewards = RewardPool(RewardConfig(components=g.rewards.components, timeout_s=g.rewards.timeout_s,
                                      num_workers=1, num_cpus_per_worker=reward_num_cpus))
    return DomainData(name, rows.train, rows.validation, rows.test, rewards, g.accuracy_component,
                      g.rollout.max_new_tokens)


def mixed_pretrain_kwargs(domains: list[DomainEntry], kwargs: dict) -> dict:
    """`pretrain.task: mixed` -> the `mixture` of every configured domain's pretraining document (with
    the domain's task_kwargs), drawn by `kwargs.weights` (default 1 each)."""
    unknown = set(kwargs) - {"weights"}
    if unknown:
        raise ValueError(f"pretrain.task.kwargs of the mixed task: unknown keys {sorted(unknown)} (takes: weights)")
    weights = kwargs.get("weights") or {}
    if set(weights) - {e.name for e in domains}:
        raise ValueError(f"pretrain.task.kwargs.weights names {sorted(set(weights) - {e.name for e in domains})}, "
                         f"not configured domains {[e.name for e in domains]}")
    return {"parts": {e.name: get_domain(e.name).pretrain_part(weights.get(e.name, 1.0), e.task_kwargs)
                      for e in domains}}


# ---- the pipeline -------------------------------------------------------------------------------
def _done(path: Path) -> bool:
    return (path / "config.json").exists()


def _grpo_eval(run_dir: Path) -> tuple[float, float]:
    evals = [m["eval/accuracy"] for m in read_metrics(run_dir) if "eval/accuracy" in m]
    return (evals[0], evals[-1]) if evals else (float("nan"), float("nan"))


def train_specialist(g: GRPOConfig, resolve, show_progress: bool) -> Path:
    from .grpo_loop import GRPOTrainer

    trainer = GRPOTrainer(g, resume=False, resolve=resolve)
    try:
        return trainer.fit(show_progress)
    finally:  # free the actors' CPU reservations before the next domain's run
        trainer.shutdown()


def make_base(cfg: DistillConfig, root: Path, resume: bool, resolve, show_progress: bool) -> str:
    from dsarl.learner.pretrain import pretrain

    base = resolve(cfg.base) if cfg.base else str(root / "base" / "final")
    if cfg.base is None and not (resume and _done(Path(base))):
        p = copy.deepcopy(cfg.pretrain)
        p.run_dir, p.seed, p.tensorboard = str(root / "base"), cfg.seed, cfg.tensorboard
        if cfg.deterministic:
            p.num_threads = p.num_threads or cfg.num_threads or 1
        if p.task.name == "mixed":
            p.task.name, p.task.kwargs = "mixture", mixed_pretrain_kwargs(cfg.domains, p.task.kwargs)
        pretrain(p, resolve=resolve, show_progress=show_progress)
    return base


def run_distill(cfg: DistillConfig, resume: bool = False, resolve=lambda p: p, show_progress: bool = True) -> dict:
    """One seed's pipeline (cfg.seed); `cfg.seeds` is launch/distill_seeds.py's."""
    if cfg.seeds:
        raise ValueError(f"run_distill runs one seed (seed: {cfg.seed}); seeds {cfg.seeds}: distill_seeds.run_seeds")
    from dsarl.actors.teacher_pool import TeacherPool
    from dsarl.models import from_pretrained, save_pretrained

    from .stage_pretrain import write_resolved_config

    if cfg.deterministic:
        apply_determinism(cfg)
    elif cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    root = Path(cfg.run_dir)
    names = [e.name for e in cfg.domains]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"domains must be distinct and non-empty, got {names}")
    write_resolved_config(cfg, root)
    times: dict[str, float] = {}

    t = time.perf_counter()
    base = make_base(cfg, root, resume, resolve, show_progress)
    times["pretrain"] = time.perf_counter() - t

    init_ray(RayConfig(num_cpus=cfg.ray_num_cpus, include_dashboard=False))
    specialists, grpo_cfgs, grpo_evals = {}, {}, {}
    for entry in cfg.domains:
        t = time.perf_counter()
        g = grpo_cfgs[entry.name] = specialist_config(cfg, entry, base)
        if entry.checkpoint:
            specialists[entry.name] = resolve(entry.checkpoint)
        else:
            final = Path(g.run_dir) / "final"
            if not (resume and _done(final)):
                train_specialist(g, resolve, show_progress)
            specialists[entry.name] = str(final)
            grpo_evals[entry.name] = _grpo_eval(Path(g.run_dir))
        times[f"specialist:{entry.name}"] = time.perf_counter() - t

    student_dir = root / "student" / "final"
    choices_file = root / "student" / "choices.json"
    sft_metrics: dict = {}
    train_the_student = not (resume and _done(student_dir))
    # every domain's reward worker and the teachers start at once (each waits for its processes)
    makers = {f"data:{e.name}": (lambda e=e: domain_data(grpo_cfgs[e.name], e.name, cfg.reward_num_cpus, resolve,
                                                         cfg.num_validation)) for e in cfg.domains}
    if train_the_student:
        makers["teachers"] = lambda: TeacherPool(specialists, cfg.teachers.num_workers,
                                                 cfg.teachers.num_cpus_per_worker, cfg.teachers.max_batch_size)
    started, error = start_together(**makers)
    if error is not None:
        for part in started.values():
            (part.rewards if isinstance(part, DomainData) else part).shutdown()
        raise error
    data = {e.name: started[f"data:{e.name}"] for e in cfg.domains}
    if train_the_student:
        teachers = started["teachers"]
        model, tokenizer = from_pretrained(base)
        logger = MetricsLogger(root / "student", tensorboard=cfg.tensorboard)
        try:
            choices, sft_metrics, student_times = train_student(cfg, data, teachers, model, tokenizer,
                                                                root / "student", logger, show_progress)
        finally:
            logger.close()
            teachers.shutdown()
        times.update(student_times)
        save_pretrained(model, student_dir, tokenizer)
        choices_file.write_text(json.dumps({"choices": choices, "sft_data": sft_metrics}, indent=2))
    else:
        saved = json.loads(choices_file.read_text()) if choices_file.exists() else {}
        choices, sft_metrics = saved.get("choices", {}), saved.get("sft_data", {})

    # held-out rows, read here for the first time: every choice above is made
    t = time.perf_counter()
    models = {"base": base, **{f"specialist:{d}": specialists[d] for d in names}, "student": str(student_dir)}
    acc: dict[str, dict[str, float]] = {}
    for label, path in tqdm(models.items(), desc="distill eval (models)", disable=not show_progress):
        model, tokenizer = from_pretrained(path)
        engine = NativeEngine(model.requires_grad_(False), tokenizer, max_batch_size=cfg.max_batch_size)
        acc[label] = {d: evaluate(engine, tokenizer, data[d], data[d].test[:cfg.eval_samples]) for d in names}
    times["eval"] = time.perf_counter() - t
    for dom in data.values():
        dom.rewards.shutdown()
    return write_report(root, acc, names, grpo_evals, sft_metrics, times, choices, cfg.num_validation)
