"""Specialist distillation's validation split and choices: the split is disjoint from train and held-out
rows; the choice functions against plain references; the student stage reads no held-out row (a
held-out set that raises on any read, and one of garbage, leave every choice and the weights unchanged);
deterministic: true gives bit-identical pipeline runs; the spread over seeds."""
import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import ray
import torch

from dsarl.actors.teacher_pool import TeacherPool
from dsarl.data.domains import DOMAINS, DomainRows, validation_rows
from dsarl.launch.distill_pipeline import (DistillConfig, DomainData, DomainEntry, OPDConfig, SFTConfig,
                                          apply_determinism, domain_rows, run_distill, specialist_config)
from dsarl.launch.distill_report import goal_checks, spread, write_seed_report
from dsarl.launch.distill_seeds import seed_config
from dsarl.launch.distill_select import BestState, choose_teachers, gap_weights, selection_score
from dsarl.launch.distill_student import train_student
from dsarl.launch.grpo_loop import GRPOConfig, PromptData, RolloutConfig
from dsarl.learner.distill import Sequences, completion_log_probs
from dsarl.learner.metrics import MetricsLogger
from dsarl.learner.pretrain import PretrainConfig
from dsarl.models import DSAConfig, build_model, from_pretrained, save_pretrained
from dsarl.rewards.config import RewardConfig
from fresh_seeds import fresh_seed

TINY = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
            index_head_dim=16, index_topk=4)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a cluster another process started
    yield
    ray.shutdown()


@pytest.fixture
def restore_torch():
    """apply_determinism changes process-wide torch settings: put them back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


def save_tiny(path, seed):
    save_pretrained(build_model(DSAConfig(**TINY), seed=seed), path)
    return str(path)


def prompts(rows):
    return {str(r["prompt"]) for r in rows}


# ---- the validation split --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_validation_split_is_disjoint_from_train_and_held_out_rows(name):
    cfg = DistillConfig(specialist=GRPOConfig(data=PromptData(num_train=60, num_test=40)))
    # math with one-digit sums has 100 prompts: train and test take most, validation must draw past them
    kwargs = {"max_digits": 1, "ops": "+"} if name == "math" else {}
    g = specialist_config(cfg, DomainEntry(name, task_kwargs=kwargs), "BASE")
    rows = domain_rows(g, 20, lambda p: p)
    assert len(rows.validation) == 20
    assert not prompts(rows.validation) & prompts(rows.train) and not prompts(rows.validation) & prompts(rows.test)
    assert not prompts(rows.train) & prompts(rows.test)
    assert all(r["id"].startswith(f"{g.data.task}-validation-") for r in rows.validation)
    # the split is a function of the seed: the same rows again, other rows for another seed
    assert rows.validation == domain_rows(g, 20, lambda p: p).validation
    g.seed = 1
    assert rows.validation != domain_rows(g, 20, lambda p: p).validation


def test_validation_split_fails_clearly_when_the_task_has_too_few_prompts():
    taken = [{"prompt": f"{a}+{b}="} for a in range(10) for b in range(10)]  # every one-digit sum
    with pytest.raises(ValueError, match="validation prompts"):
        validation_rows("arithmetic", {"max_digits": 1, "ops": "+"}, 5, 0, taken)
    with pytest.raises(AssertionError, match="train and validation"):
        DomainRows(train=[{"prompt": "a"}], validation=[{"prompt": "a"}], test=[])


# ---- the choice functions ----------------------------------------------------------------------------
def test_choose_teachers_against_a_plain_reference():
    rng = random.Random(fresh_seed())
    for _ in range(50):
        ds = ["math", "code", "retrieval"][: rng.randint(1, 3)]
        acc = {s: {d: rng.choice([0.2, 0.5, 0.52, 0.8]) for d in ds} for s in ds}
        margin = rng.choice([0.0, 0.05, 0.5])
        got = choose_teachers(acc, "validation", margin)
        for d in ds:
            best = max(acc[s][d] for s in ds)
            expect = {s for s in ds if acc[s][d] >= best - margin - 1e-9}
            assert set(got[d]) == expect and len(got[d]) == len(expect)
            assert (got[d][0] == d) == (d in expect)  # the own specialist first when it qualifies
        assert choose_teachers(acc, "own") == {d: [d] for d in ds}
    with pytest.raises(ValueError, match="opd.teacher"):
        choose_teachers({"m": {"m": 1.0}}, "best")


def test_gap_weights_score_and_best_state():
    assert gap_weights({"a": 0.8, "b": 0.5}, {"a": 0.6, "b": 0.7}, 0.1) == pytest.approx({"a": 0.3, "b": 0.1})
    assert selection_score({"a": 0.6, "b": 0.7}, {"a": 0.8, "b": 0.5}) == pytest.approx((-0.2, 0.0))
    model = torch.nn.Linear(2, 2)
    best = BestState(patience=2)
    scores = [(-0.3, 0.0), (-0.1, -0.2), (-0.1, -0.3), (-0.2, 0.5), (0.0, 0.0)]
    stops = []
    for step, s in enumerate(scores):
        with torch.no_grad():
            model.weight.fill_(step)
        stops.append(best.update(step, s, model))
    assert stops == [False, False, False, True, False] and best.step == 4
    assert torch.equal(best.state["weight"], torch.full((2, 2), 4.0))


# ---- the student stage reads validation, never held-out rows -----------------------------------------
class Poison(list):
    """Held-out rows that fail any read: a choice that looked at them would raise."""

    def _fail(self, *a, **k):
        raise AssertionError("the student stage read a held-out row")

    __iter__ = __getitem__ = __len__ = __bool__ = __contains__ = _fail


def _domain(name, test, rewards, seed=0):
    d = DOMAINS[name]
    kwargs = {**d.task_kwargs, **({"context_len": 32} if name == "retrieval" else {})}
    from dsarl.data.tasks import make_rows

    train = make_rows(d.task, 12, seed, "train", **kwargs)
    val = validation_rows(d.task, kwargs, 4, seed, train)
    return DomainData(name, train, val, test, rewards, d.accuracy_component, d.max_new_tokens)


def _student_run(tmp_path, tag, tests, ckpts, base, reward_pools):
    cfg = DistillConfig(
        domains=[DomainEntry("math", opd_weight=2.0), DomainEntry("code"), DomainEntry("retrieval")],
        sft=SFTConfig(prompts=6, samples_per_prompt=2, reward_threshold=-1.0, steps=2, batch_size=4, min_samples=1),
        opd=OPDConfig(steps=3, prompts_per_step=3, samples_per_prompt=2, teacher="validation", teacher_margin=1.0,
                      weights="validation_gap", eval_every=1, keep_best=True, patience=2),
        max_batch_size=16, num_threads=1)
    apply_determinism(cfg)
    data = {n: _domain(n, tests[n], reward_pools[n]) for n in ("math", "code", "retrieval")}
    teachers = TeacherPool(ckpts, num_workers=1, num_cpus_per_worker=0.25)  # with the reward pools: 1.5 of 2 CPUs
    model, tok = from_pretrained(base)
    logger = MetricsLogger(tmp_path / tag, tensorboard=False)
    try:
        choices, sft_metrics, _ = train_student(cfg, data, teachers, model, tok, tmp_path / tag, logger, False)
    finally:
        logger.close()
        teachers.shutdown()
    return choices, sft_metrics, {k: v.clone() for k, v in model.state_dict().items()}


def test_choices_read_no_held_out_row(ray_local, tmp_path, restore_torch):
    from dsarl.actors.reward_workers import RewardPool

    ckpts = {n: save_tiny(tmp_path / n, i + 1) for i, n in enumerate(("math", "code", "retrieval"))}
    base = save_tiny(tmp_path / "base", 0)
    pools = {n: RewardPool(RewardConfig(components=list(DOMAINS[n].rewards), num_workers=1, num_cpus_per_worker=0.25))
             for n in ckpts}
    try:
        poisoned = _student_run(tmp_path, "poison", {n: Poison() for n in ckpts}, ckpts, base, pools)
        garbage = {n: [{"prompt": "zz" * k, "answer": "?", "id": f"g{k}"} for k in range(7)] for n in ckpts}
        rerun = _student_run(tmp_path, "garbage", garbage, ckpts, base, pools)
    finally:
        for p in pools.values():
            p.shutdown()
    choices, sft_metrics, state = poisoned
    assert choices == rerun[0] and sft_metrics == rerun[1]
    assert all(torch.equal(state[k], rerun[2][k]) for k in state)  # the same student, bit for bit
    # what was chosen: every specialist within margin 1.0 teaches every domain (a mixture); the kept step
    # and the early stop follow the recorded validation accuracies (a plain re-derivation, patience 2)
    assert all(sorted(ts) == sorted(ckpts) and ts[0] == d for d, ts in choices["teachers"].items())
    phases = [v["phase"] for v in choices["validation"]]
    assert phases[:2] == ["base", "sft"] and set(phases[2:]) == {"opd"}
    target = choices["target"]
    scores = [(min(v["accuracy"][d] - target[d] for d in target),
               sum(v["accuracy"][d] - target[d] for d in target) / len(target)) for v in choices["validation"][2:]]
    best, since, stop_at = 0, 0, None
    for i in range(1, 4):  # evals before steps 0, 1, 2 and after the last (step 3)
        if i >= len(scores):
            break
        best, since = (i, 0) if scores[i] > scores[best] else (best, since + 1)
        if since >= 2 and i < 3:
            stop_at = i
            break
    assert choices["best_step"] == best and choices.get("stopped_early", False) == (stop_at is not None)
    assert choices["steps_run"] == (stop_at if stop_at is not None else 3) and len(scores) == choices["steps_run"] + 1
    assert len(choices["weights"]) == 1 + choices["steps_run"]  # re-weighted at each eval before a step


def test_mixture_of_teachers_is_the_log_of_their_mean_distribution(ray_local, tmp_path):
    ckpts = {"math": save_tiny(tmp_path / "m", 1), "code": save_tiny(tmp_path / "c", 2)}
    teachers = TeacherPool(ckpts, num_workers=2, num_cpus_per_worker=0.25)
    try:
        sets = [["math", "code"], ["code"], ["code", "math"]]
        p = [[1, 10 + i] for i in range(3)]
        c = [[20 + i, 21, 2][: 1 + i] for i in range(3)]
        got = teachers.mixture_log_probs(sets, p, c)
    finally:
        teachers.shutdown()
    for ts, pi, ci, g in zip(sets, p, c, got):
        probs = [completion_log_probs(from_pretrained(ckpts[t])[0], Sequences([pi], [ci]))[0].exp() for t in ts]
        assert torch.allclose(g, torch.stack(probs).mean(0).log(), atol=1e-5)


# ---- determinism ------------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metrics(path: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock keys (time, time/<phase>, tokens_per_s, step_time_s), which
    differ run to run by nature."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k == "time" or k.startswith("time/") or k.endswith("_s"))}
            for r in rows]


def test_deterministic_pipeline_runs_are_bit_identical(ray_local, tmp_path, restore_torch):
    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text("\n".join(f"{k}: {v}" for k, v in {**TINY, "vocab_size": 264}.items()))
    runs = []
    for tag in ("a", "b"):
        cfg = DistillConfig(
            run_dir=str(tmp_path / tag), deterministic=True, num_threads=1,
            pretrain=PretrainConfig(steps=3, batch_size=2, seq_len=32, log_every=1, save_every=3, tensorboard=False),
            domains=[DomainEntry("math", task_kwargs={"max_digits": 1}),
                     DomainEntry("code", checkpoint=save_tiny(tmp_path / "c", 2)),
                     DomainEntry("retrieval", task_kwargs={"context_len": 32}, checkpoint=save_tiny(tmp_path / "r", 3))],
            specialist=GRPOConfig(data=PromptData(num_train=16, num_test=8),
                                  rollout=RolloutConfig(num_workers=2, num_cpus_per_worker=0.25, max_batch_size=16),
                                  steps=2, prompts_per_step=2, group_size=2, save_every=2, learner_num_cpus=0.25,
                                  write_rollouts=False, tensorboard=False),
            sft=SFTConfig(prompts=6, samples_per_prompt=2, reward_threshold=-1.0, steps=2, batch_size=4, min_samples=1),
            opd=OPDConfig(steps=2, prompts_per_step=3, samples_per_prompt=2, teacher="validation", eval_every=1),
            eval_samples=4, num_validation=3, max_batch_size=16)
        cfg.pretrain.model.config = str(model_yaml)
        cfg.pretrain.task.name = "mixed"
        cfg.specialist.rewards.num_cpus_per_worker = 0.25
        results = run_distill(cfg, show_progress=False)
        root = Path(cfg.run_dir)
        runs.append({"results": {k: results[k] for k in ("accuracy", "choices", "sft_data", "grpo_evals")},
                     "weights": [_sha(root / p / "model.safetensors")
                                 for p in ("base/final", "specialists/math/final", "student/final")],
                     "metrics": [_metrics(root / p / "metrics.jsonl") for p in ("base", "specialists/math", "student")]})
    a, b = runs
    assert a["weights"] == b["weights"]
    assert a["metrics"] == b["metrics"] and a["results"] == b["results"]
    assert len(a["metrics"][1]) >= 2 and len(a["metrics"][2]) >= 4  # the runs did train


# ---- seeds ------------------------------------------------------------------------------------------------
def test_spread_over_seeds_and_the_seed_report(tmp_path):
    rng = random.Random(fresh_seed())
    ds = ["math", "code"]
    models = ["base", "specialist:math", "specialist:code", "student"]
    accs = {s: {m: {d: rng.random() for d in ds} for m in models} for s in (0, 1, 2)}
    # seed 1 passes: its student is 1 point under the math specialist (drawn from [0.5, 1), so the student
    # stays above the base's 0; a draw under 0.01 once put it at -0.4%) and at 100% on code
    accs[1]["specialist:math"]["math"] = 0.5 + rng.random() / 2
    accs[1]["student"] = {"math": accs[1]["specialist:math"]["math"] - 0.01, "code": 1.0}
    accs[1]["base"] = {"math": 0.0, "code": 0.0}
    sp = spread(accs)
    for m in models:
        for d in ds:
            vals = [accs[s][m][d] for s in accs]
            assert sp[m][d]["min"] == min(vals) and sp[m][d]["max"] == max(vals)
            assert math.isclose(sp[m][d]["mean"], sum(vals) / 3)
    res = write_seed_report(tmp_path, {s: {"accuracy": a} for s, a in accs.items()}, ds, 60.0)
    assert res["passed"]["1"] is True
    assert res["passed"] == {str(s): all(ok for _, ok in goal_checks(a, ds)) for s, a in accs.items()}
    assert res["gaps"]["0"]["code"] == pytest.approx(accs[0]["student"]["code"] - accs[0]["specialist:code"]["code"])
    assert "| seed |" in (tmp_path / "report.md").read_text() and (tmp_path / "accuracy.png").exists()


def test_seed_config_reuses_the_first_seeds_specialists_only_when_asked():
    cfg = DistillConfig(run_dir="R", seeds=[5, 6], domains=[DomainEntry("math"), DomainEntry("code", checkpoint="C")])
    own = seed_config(cfg, 6, None)
    assert own.seed == 6 and own.seeds == [] and own.run_dir == str(Path("R") / "seed6") and own.base is None
    assert own.domains[0].checkpoint is None
    reused = seed_config(cfg, 6, 5)
    assert reused.base == str(Path("R/seed5/base/final"))
    assert reused.domains[0].checkpoint == str(Path("R/seed5/specialists/math/final"))
    assert reused.domains[1].checkpoint == "C"  # a given checkpoint stays
    first = seed_config(cfg, 5, 5)
    assert first.base is None and first.domains[0].checkpoint is None
    assert cfg.seeds == [5, 6] and cfg.domains[0].checkpoint is None  # the template is not changed
