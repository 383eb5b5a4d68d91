"""`dsarl distill CONFIG`: specialist distillation (DESIGN.md section 5, DSA.md 4.2) on a local Ray.

1. base        a checkpoint from the config, or `pretrain` on the `mixed` task: a `mixture` of every
               domain's pretraining document (data/domains.py Domain.pretrain_document)
2. specialists one GRPO run per domain from the base (data/domains.py gives its task, reward mix and
               accuracy component), or an existing checkpoint per domain; their GRPO evals are kept
3. teachers    one pool of rollout workers per specialist (actors/teacher_pool.py)
4. student     starts from the base, trained in this process (learner/distill.py):
               a. SFT on specialist samples whose total reward beats a threshold (rejection
                  sampling), each batch mixed across domains by `sft_weight`
               b. on-policy distillation: the student samples prompts drawn by `opd_weight`, the
                  specialist of each prompt's domain returns its full log-distributions at the
                  student's tokens, the loss is the exact per-token reverse KL(student || teacher)
               either or both (a then b); `opd.sft_coef` keeps the SFT term inside b as well
5. report      greedy held-out accuracy of base, each specialist and the student on every domain
               (the rows and rule of GRPOTrainer.evaluate): printed, report.md, accuracy.png,
               results.json in run_dir.
With --resume a stage whose output already exists is not run again.
"""
import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.data.domains import get_domain
from dsarl.data.rollout_schema import completions_to_table, write_rollouts
from dsarl.learner.distill import Distiller, Sequences
from dsarl.learner.distill_loss import rejection_filter
from dsarl.learner.metrics import MetricsLogger, read_metrics
from dsarl.learner.optim import OptimConfig, lr_at
from dsarl.learner.pretrain import PretrainConfig
from dsarl.rewards.config import RewardConfig
from dsarl.rewards.types import RewardSample

from .grpo_loop import GRPOConfig, PromptData, load_prompt_rows, prompt_ids_for
from .ray_setup import RayConfig, init_ray


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
    return g


@dataclass
class DomainData:
    """What the distillation needs of one domain: its rows, reward pool and accuracy rule."""

    name: str
    train: list[dict]
    test: list[dict]
    rewards: object  # RewardPool
    accuracy_component: str
    max_new_tokens: int

    def score(self, rows: list[dict], completions) -> list[dict[str, float]]:
        samples = [RewardSample(prompt=rows[c.prompt_index]["prompt"], completion=c.text, num_tokens=len(c.token_ids),
                                row=rows[c.prompt_index], group_id=c.prompt_index, sample_index=c.sample_index,
                                finish_reason=c.finish_reason) for c in completions]
        return self.rewards.score(samples)[0]


def domain_data(g: GRPOConfig, name: str, reward_num_cpus: float, resolve) -> DomainData:
    from dsarl.actors.reward_workers import RewardPool

    train, test = load_prompt_rows(g.data, g.seed, resolve)
    rewards = RewardPool(RewardConfig(components=g.rewards.components, timeout_s=g.rewards.timeout_s,
                                      num_workers=1, num_cpus_per_worker=reward_num_cpus))
    return DomainData(name, train, test, rewards, g.accuracy_component, g.rollout.max_new_tokens)


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


def split_by_weight(total: int, weights: dict[str, float]) -> dict[str, int]:
    """`total` items over the keys in proportion to `weights` (largest remainder; sums to total)."""
    s = sum(weights.values())
    if s <= 0:
        raise ValueError(f"weights must have a positive sum, got {weights}")
    exact = {k: total * w / s for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[: total - sum(out.values())]:
        out[k] += 1
    return out


# ---- stages ---------------------------------------------------------------------------------------
def evaluate(engine: NativeEngine, tokenizer, dom: DomainData, n: int) -> float:
    """Greedy held-out accuracy: the share of rows whose accuracy component is above 0.5."""
    rows = dom.test[:n]
    comps = engine.generate(prompt_ids_for(rows, tokenizer, "raw"),
                            SamplingParams(temperature=0.0, max_new_tokens=dom.max_new_tokens))
    scores = dom.score(rows, comps)
    return sum(s[dom.accuracy_component] > 0.5 for s in scores) / len(scores)


def specialist_samples(teachers, dom: DomainData, tokenizer, n_prompts: int, sft: SFTConfig, seed: int, out_dir: Path):
    """Specialist rollouts of `n_prompts` train prompts, scored, filtered by reward; written as Parquet.
    -> (kept (prompt_ids, completion_ids) pairs, metrics)."""
    rng = random.Random(f"{seed}/sft/{dom.name}")
    rows = [rng.choice(dom.train) for _ in range(n_prompts)]
    params = SamplingParams(temperature=sft.temperature, max_new_tokens=dom.max_new_tokens, n=sft.samples_per_prompt,
                            seed=seed * 1_000_003 + 17)
    comps = teachers.generate(dom.name, prompt_ids_for(rows, tokenizer, "raw"), params)
    scores = dom.score(rows, comps)
    total = torch.tensor([s["total"] for s in scores])
    keep = rejection_filter(total, sft.reward_threshold)
    table = completions_to_table(
        comps, prompt_ids=[str(rows[c.prompt_index]["id"]) for c in comps],
        group_ids=[f"sft-{dom.name}-{c.prompt_index}" for c in comps],
        metadata=[{k: v for k, v in rows[c.prompt_index].items() if k != "prompt"} | {"kept": bool(k)}
                  for c, k in zip(comps, keep.tolist())],
        reward_components=[{k: v for k, v in s.items() if k != "total"} for s in scores], rewards=total.tolist())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rollouts(table, out_dir / f"{dom.name}.parquet")
    kept = [(c.prompt_ids, c.token_ids) for c, k in zip(comps, keep.tolist()) if k]
    acc = sum(s[dom.accuracy_component] > 0.5 for s in scores) / max(1, len(scores))
    return kept, {f"sft_data/{dom.name}/kept": len(kept), f"sft_data/{dom.name}/samples": len(comps),
                  f"sft_data/{dom.name}/accuracy": acc}


def mixed_batch(pools: dict[str, list], weights: dict[str, float], size: int, rng: random.Random) -> Sequences:
    """`size` examples, per domain in proportion to its weight (domains with no kept sample skipped)."""
    live = {d: w for d, w in weights.items() if pools.get(d) and w > 0}
    counts = split_by_weight(size, live)
    pairs = [rng.choice(pools[d]) for d in sorted(counts) for _ in range(counts[d])]
    return Sequences([p for p, _ in pairs], [c for _, c in pairs])


def run_sft(distiller: Distiller, pools, weights, sft: SFTConfig, seed: int, logger, step0: int,
            show_progress: bool = True) -> int:
    rng = random.Random(f"{seed}/sft/batches")
    bar = tqdm(range(sft.steps), desc="distill sft", disable=not show_progress)
    for step in bar:
        batch = mixed_batch(pools, weights, sft.batch_size, rng)
        m = distiller.step(lr_at(step, sft.steps, sft.optim), sft=batch)
        logger.log(step0 + step + 1, {"phase": "sft", **m})
        bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
    return step0 + sft.steps


def run_opd(distiller: Distiller, engine: NativeEngine, tokenizer, teachers, data: dict[str, DomainData],
            weights: dict[str, float], cfg: DistillConfig, pools, logger, step0: int,
            show_progress: bool = True) -> int:
    opd, seed = cfg.opd, cfg.seed
    rng = random.Random(f"{seed}/opd")
    counts = split_by_weight(opd.prompts_per_step, weights)
    bar = tqdm(range(opd.steps), desc="distill on-policy", disable=not show_progress)
    for step in bar:
        t0 = time.perf_counter()
        prompts, completions, domains = [], [], []
        for j, name in enumerate(sorted(counts)):
            rows = [rng.choice(data[name].train) for _ in range(counts[name])]
            if not rows:
                continue
            params = SamplingParams(temperature=opd.temperature, max_new_tokens=data[name].max_new_tokens,
                                    n=opd.samples_per_prompt, seed=(seed * 1_000_003 + step) * 101 + j)
            comps = engine.generate(prompt_ids_for(rows, tokenizer, "raw"), params)
            prompts += [c.prompt_ids for c in comps]
            completions += [c.token_ids for c in comps]
            domains += [name] * len(comps)
        t1 = time.perf_counter()
        teacher_logp = teachers.log_probs(domains, prompts, completions)
        t2 = time.perf_counter()
        sft = mixed_batch(pools, cfg_sft_weights(cfg), cfg.sft.batch_size, rng) if opd.sft_coef > 0 and any(pools.values()) else None
        m = distiller.step(lr_at(step, opd.steps, opd.optim), sft=sft, opd=Sequences(prompts, completions),
                           teacher_logp=teacher_logp, sft_coef=opd.sft_coef)
        logger.log(step0 + step + 1, {"phase": "opd", **m, "time/generate": t1 - t0, "time/teacher": t2 - t1,
                                      "time/learn": time.perf_counter() - t2})
        bar.set_postfix(reverse_kl=f"{m['opd/reverse_kl']:.3f}")
    return step0 + opd.steps


def cfg_sft_weights(cfg: DistillConfig) -> dict[str, float]:
    return {e.name: e.sft_weight for e in cfg.domains}


# ---- report -------------------------------------------------------------------------------------
def report_table(acc: dict[str, dict[str, float]], domains: list[str]) -> str:
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    lines += [f"| {m} | " + " | ".join(f"{100 * row[d]:.1f}" for d in domains) + " |" for m, row in acc.items()]
    return "\n".join(lines)


def goal_checks(acc: dict[str, dict[str, float]], domains: list[str], margin: float = 0.05) -> list[tuple[str, bool]]:
    """The issue's bar: the student within `margin` of each specialist on its own domain, above the base on all."""
    st, base = acc["student"], acc["base"]
    out = [(f"student within {100 * margin:.0f} points of the {d} specialist on {d} "
            f"({100 * st[d]:.1f} vs {100 * acc[f'specialist:{d}'][d]:.1f})",
            st[d] >= acc[f"specialist:{d}"][d] - margin - 1e-9) for d in domains]
    out += [(f"student above base on {d} ({100 * st[d]:.1f} vs {100 * base[d]:.1f})", st[d] > base[d]) for d in domains]
    return out


def plot_accuracy(acc: dict[str, dict[str, float]], domains: list[str], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(acc)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2.2 * len(domains) + 2, 3.8))
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [100 * acc[m][d] for d in domains], width, label=m)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("held-out accuracy (%, greedy)"), ax.set_ylim(0, 100), ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_report(root: Path, acc, domains, grpo_evals, sft_metrics, times) -> dict:
    table = report_table(acc, domains)
    checks = goal_checks(acc, domains)
    plot = plot_accuracy(acc, domains, root / "accuracy.png")
    text = ["# specialist distillation", "", "Held-out accuracy (%), greedy decoding:", "", table, "",
            "Goals:", *[f"- [{'x' if ok else ' '}] {name}" for name, ok in checks], "",
            "Specialist GRPO evals (own domain, before -> after): "
            + ", ".join(f"{d} {100 * a:.1f} -> {100 * b:.1f}" for d, (a, b) in grpo_evals.items()), "",
            "Times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), "",
            f"![accuracy]({plot.name})", ""]
    (root / "report.md").write_text("\n".join(text))
    results = {"accuracy": acc, "goals": [{"goal": n, "met": ok} for n, ok in checks], "grpo_evals": grpo_evals,
               "sft_data": sft_metrics, "times_s": times}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(text[2:-2]))
    return results


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
        if hasattr(trainer, "shutdown"):  # GRPOTrainer.shutdown also frees its placement group
            trainer.shutdown()
        else:
            trainer.rollout.shutdown()
            trainer.rewards.shutdown()
            ray.kill(trainer.learner)


def run_distill(cfg: DistillConfig, resume: bool = False, resolve=lambda p: p, show_progress: bool = True) -> dict:
    from dsarl.actors.teacher_pool import TeacherPool
    from dsarl.learner.pretrain import pretrain
    from dsarl.models import from_pretrained, save_pretrained

    from .stage_pretrain import write_resolved_config

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    root = Path(cfg.run_dir)
    names = [e.name for e in cfg.domains]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"domains must be distinct and non-empty, got {names}")
    write_resolved_config(cfg, root)
    times: dict[str, float] = {}

    t = time.perf_counter()
    base = resolve(cfg.base) if cfg.base else str(root / "base" / "final")
    if cfg.base is None and not (resume and _done(Path(base))):
        p = copy.deepcopy(cfg.pretrain)
        p.run_dir, p.seed, p.tensorboard = str(root / "base"), cfg.seed, cfg.tensorboard
        if p.task.name == "mixed":
            p.task.name, p.task.kwargs = "mixture", mixed_pretrain_kwargs(cfg.domains, p.task.kwargs)
        pretrain(p, resolve=resolve, show_progress=show_progress)
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

    data = {e.name: domain_data(grpo_cfgs[e.name], e.name, cfg.reward_num_cpus, resolve) for e in cfg.domains}
    student_dir = root / "student" / "final"
    sft_metrics: dict = {}
    if not (resume and _done(student_dir)):
        t = time.perf_counter()
        teachers = TeacherPool(specialists, cfg.teachers.num_workers, cfg.teachers.num_cpus_per_worker,
                               cfg.teachers.max_batch_size)
        model, tokenizer = from_pretrained(base)
        distiller = Distiller(model, cfg.sft.optim, micro_batch=cfg.max_batch_size)
        logger = MetricsLogger(root / "student", tensorboard=cfg.tensorboard)
        pools: dict[str, list] = {}
        step = 0
        if cfg.sft.enabled:
            counts = split_by_weight(cfg.sft.prompts, cfg_sft_weights(cfg))
            # one bar step per domain: each is one batched generate on that specialist's workers
            for name, n in tqdm(counts.items(), desc="distill sft data (domains sampled)", disable=not show_progress):
                pools[name], m = specialist_samples(teachers, data[name], tokenizer, n, cfg.sft, cfg.seed,
                                                    root / "student" / "sft_data")
                sft_metrics.update(m)
            times["sft_data"] = time.perf_counter() - t
            t = time.perf_counter()
            n_kept = sum(len(p) for p in pools.values())
            if n_kept < cfg.sft.min_samples:  # a few samples would only be memorised: say so, go on
                print(f"distill: SFT skipped, {n_kept} specialist samples passed the reward threshold "
                      f"{cfg.sft.reward_threshold} (sft.min_samples: {cfg.sft.min_samples})")
                sft_metrics["sft_skipped"] = 1
            else:
                step = run_sft(distiller, pools, cfg_sft_weights(cfg), cfg.sft, cfg.seed, logger, step, show_progress)
            times["sft"] = time.perf_counter() - t
        if cfg.opd.enabled:
            t = time.perf_counter()
            distiller.optim_cfg = cfg.opd.optim
            engine = NativeEngine(model, tokenizer, max_batch_size=cfg.max_batch_size)
            step = run_opd(distiller, engine, tokenizer, teachers, data, {e.name: e.opd_weight for e in cfg.domains},
                           cfg, pools, logger, step, show_progress)
            times["opd"] = time.perf_counter() - t
        logger.close()
        teachers.shutdown()
        save_pretrained(model, student_dir, tokenizer)

    t = time.perf_counter()
    models = {"base": base, **{f"specialist:{d}": specialists[d] for d in names}, "student": str(student_dir)}
    acc: dict[str, dict[str, float]] = {}
    for label, path in tqdm(models.items(), desc="distill eval (models)", disable=not show_progress):
        model, tokenizer = from_pretrained(path)
        engine = NativeEngine(model.requires_grad_(False), tokenizer, max_batch_size=cfg.max_batch_size)
        acc[label] = {d: evaluate(engine, tokenizer, data[d], cfg.eval_samples) for d in names}
    times["eval"] = time.perf_counter() - t
    for dom in data.values():
        dom.rewards.shutdown()
    return write_report(root, acc, names, grpo_evals, sft_metrics, times)
