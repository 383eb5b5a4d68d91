"""The student of `dsarl distill`: SFT data from the specialists, SFT, on-policy distillation, and every
choice on the way, each made on validation rows (launch/distill_select.py):

    teachers   opd.teacher `own`: each prompt's own specialist; `validation`: per domain, every specialist
               within opd.teacher_margin of the best one on that domain's validation rows (their mean
               distribution is the target: TeacherPool.mixture_log_probs)
    weights    opd.weights `fixed`: the domains' opd_weight; `validation_gap`: re-set at each validation
               eval to weight_floor + the student's gap to its teachers on that domain
    steps      opd.eval_every > 0: the student is evaluated on validation rows before on-policy
               distillation and every eval_every steps; opd.keep_best keeps the best state (the worst
               domain's gap first, then the mean), opd.patience stops after that many evals without gain

`train_student` reads a domain's `train` rows (SFT data, on-policy prompts) and `validation` rows (the
choices) and never its `test` rows; tests/launch/test_distill_choices.py checks that by replacing the
held-out rows with garbage.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.data.rollout_schema import completions_to_table, write_rollouts
from dsarl.learner.distill import Distiller, Sequences
from dsarl.learner.distill_loss import rejection_filter
from dsarl.learner.optim import lr_at

from .distill_select import BestState, choose_teachers, gap_weights, selection_score, teacher_accuracy
from .grpo_loop import prompt_ids_for


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


# ---- accuracy ---------------------------------------------------------------------------------------
def accuracy(dom, rows: list[dict], comps) -> float:
    """The share of rows whose accuracy component is above 0.5 (GRPOTrainer.evaluate's rule)."""
    scores = dom.score(rows, comps)
    return sum(s[dom.accuracy_component] > 0.5 for s in scores) / max(1, len(scores))


def greedy(dom) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=dom.max_new_tokens)


def evaluate(engine: NativeEngine, tokenizer, dom, rows: list[dict]) -> float:
    """Greedy accuracy of the engine's model on `rows` (validation rows for choices, test rows for the report)."""
    return accuracy(dom, rows, engine.generate(prompt_ids_for(rows, tokenizer, "raw"), greedy(dom)))


def specialists_on_validation(teachers, tokenizer, data: dict) -> dict[str, dict[str, float]]:
    """acc[specialist][domain] on each domain's validation rows, greedy, by the teacher workers."""
    return {s: {d: accuracy(dom, dom.validation,
                            teachers.generate(s, prompt_ids_for(dom.validation, tokenizer, "raw"), greedy(dom)))
                for d, dom in data.items()} for s in data}


def student_on_validation(engine, tokenizer, data: dict) -> dict[str, float]:
    engine.model.eval()
    try:
        return {d: evaluate(engine, tokenizer, dom, dom.validation) for d, dom in data.items()}
    finally:
        engine.model.train()


# ---- SFT ----------------------------------------------------------------------------------------------
def specialist_samples(teachers, dom, tokenizer, n_prompts: int, sft, seed: int, out_dir: Path):
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


def run_sft(distiller: Distiller, pools, weights, sft, seed: int, logger, step0: int,
            show_progress: bool = True) -> int:
    rng = random.Random(f"{seed}/sft/batches")
    bar = tqdm(range(sft.steps), desc="distill sft", disable=not show_progress)
    for step in bar:
        batch = mixed_batch(pools, weights, sft.batch_size, rng)
        m = distiller.step(lr_at(step, sft.steps, sft.optim), sft=batch)
        logger.log(step0 + step + 1, {"phase": "sft", **m})
        bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
    return step0 + sft.steps


# ---- on-policy distillation ------------------------------------------------------------------------------
def opd_batch(engine, tokenizer, data: dict, counts: dict[str, int], opd, seed: int, step: int, rng):
    """The student's samples of this step's prompts -> (prompts, completions, domains)."""
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
    return prompts, completions, domains


def run_opd(distiller: Distiller, engine: NativeEngine, tokenizer, teachers, data: dict, opd, weights: dict,
            teacher_sets: dict[str, list[str]], target: dict[str, float], sft_batch, seed: int, logger, step0: int,
            choices: dict, show_progress: bool = True) -> int:
    """On-policy distillation with validation evals (see the module docstring); fills `choices`."""
    rng = random.Random(f"{seed}/opd")
    best = BestState(opd.patience)
    counts = split_by_weight(opd.prompts_per_step, weights)
    choices["weights"] = [dict(weights)]

    def validate(step: int) -> bool:
        acc = student_on_validation(engine, tokenizer, data)
        choices["validation"].append({"phase": "opd", "step": step, "accuracy": acc})
        logger.log(step0 + step, {"phase": "opd-validation", **{f"validation/{d}": a for d, a in acc.items()}})
        return best.update(step, selection_score(acc, target), distiller.model), acc

    bar = tqdm(range(opd.steps), desc="distill on-policy", disable=not show_progress)
    step = 0
    for step in bar:
        if opd.eval_every and step % opd.eval_every == 0:
            stop, acc = validate(step)
            if stop:
                choices["stopped_early"] = True
                break
            if opd.weights == "validation_gap":
                weights = gap_weights(target, acc, opd.weight_floor)
                counts = split_by_weight(opd.prompts_per_step, weights)
                choices["weights"].append(dict(weights))
        t0 = time.perf_counter()
        prompts, completions, domains = opd_batch(engine, tokenizer, data, counts, opd, seed, step, rng)
        t1 = time.perf_counter()
        teacher_logp = teachers.mixture_log_probs([teacher_sets[d] for d in domains], prompts, completions)
        t2 = time.perf_counter()
        m = distiller.step(lr_at(step, opd.steps, opd.optim), sft=sft_batch(rng), opd=Sequences(prompts, completions),
                           teacher_logp=teacher_logp, sft_coef=opd.sft_coef)
        logger.log(step0 + step + 1, {"phase": "opd", **m, "time/generate": t1 - t0, "time/teacher": t2 - t1,
                                      "time/learn": time.perf_counter() - t2})
        bar.set_postfix(reverse_kl=f"{m['opd/reverse_kl']:.3f}")
    else:
        step = opd.steps
        if opd.eval_every:
            validate(step)
    choices["steps_run"] = step
    if opd.eval_every:
        choices["best_step"] = best.step
        if opd.keep_best:
            distiller.model.load_state_dict(best.state)
    return step0 + step


# ---- the whole student ---------------------------------------------------------------------------------
def train_student(cfg, data: dict, teachers, model, tokenizer, out_dir: Path, logger,
                  show_progress: bool = True) -> tuple[dict, dict, dict]:
    """SFT and/or on-policy distillation of `model` (the base, trained in place) by the specialists in
    `teachers`. `data[d]`: DomainData whose train and validation rows are read (test rows never).
    -> (choices, sft metrics, times)."""
    names = list(data)
    times, sft_metrics, pools = {}, {}, {}
    sft_weights = {e.name: e.sft_weight for e in cfg.domains}
    distiller = Distiller(model, cfg.sft.optim, micro_batch=cfg.max_batch_size)
    engine = NativeEngine(model, tokenizer, max_batch_size=cfg.max_batch_size)
    t = time.perf_counter()
    val_acc = specialists_on_validation(teachers, tokenizer, data)
    teacher_sets = choose_teachers(val_acc, cfg.opd.teacher, cfg.opd.teacher_margin)
    target = teacher_accuracy(val_acc, teacher_sets)
    choices = {"specialists_validation": val_acc, "teachers": teacher_sets, "target": target,
               "validation": [{"phase": "base", "step": 0, "accuracy": student_on_validation(engine, tokenizer, data)}]}
    times["validation"] = time.perf_counter() - t
    step = 0
    if cfg.sft.enabled:
        t = time.perf_counter()
        counts = split_by_weight(cfg.sft.prompts, sft_weights)
        # one bar step per domain: each is one batched generate on that specialist's workers
        for name, n in tqdm(counts.items(), desc="distill sft data (domains sampled)", disable=not show_progress):
            pools[name], m = specialist_samples(teachers, data[name], tokenizer, n, cfg.sft, cfg.seed,
                                                out_dir / "sft_data")
            sft_metrics.update(m)
        times["sft_data"] = time.perf_counter() - t
        t = time.perf_counter()
        n_kept = sum(len(p) for p in pools.values())
        if n_kept < cfg.sft.min_samples:  # a few samples would only be memorised: say so, go on
            print(f"distill: SFT skipped, {n_kept} specialist samples passed the reward threshold "
                  f"{cfg.sft.reward_threshold} (sft.min_samples: {cfg.sft.min_samples})")
            sft_metrics["sft_skipped"] = 1
        else:
            step = run_sft(distiller, pools, sft_weights, cfg.sft, cfg.seed, logger, step, show_progress)
            choices["validation"].append({"phase": "sft", "step": cfg.sft.steps,
                                          "accuracy": student_on_validation(engine, tokenizer, data)})
        times["sft"] = time.perf_counter() - t
    if cfg.opd.enabled:
        t = time.perf_counter()
        distiller.optim_cfg = cfg.opd.optim
        use_sft = cfg.opd.sft_coef > 0 and any(pools.values())

        def sft_batch(rng):
            return mixed_batch(pools, sft_weights, cfg.sft.batch_size, rng) if use_sft else None

        run_opd(distiller, engine, tokenizer, teachers, data, cfg.opd, {e.name: e.opd_weight for e in cfg.domains},
                teacher_sets, target, sft_batch, cfg.seed, logger, step, choices, show_progress)
        times["opd"] = time.perf_counter() - t
    assert set(names) == set(choices["target"]), (names, choices["target"])
    return choices, sft_metrics, times
