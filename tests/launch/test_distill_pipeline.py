"""Specialist distillation: domains and their configs, rejection filtering, domain-weighted mixing,
routing to teachers (pure and on Ray), and a small end-to-end `dsarl distill` run writing its report."""
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import ray
import torch

from dsarl.data.step_types import Completion
from dsarl.actors.teacher_pool import TeacherPool, route_by_domain
from dsarl.data.domains import DOMAINS, mixed
from dsarl.data.tasks import make_rows
from dsarl.launch.config import load_config
from dsarl.launch.distill_pipeline import (DistillConfig, DomainData, DomainEntry, OPDConfig, SFTConfig, run_distill,
                                          specialist_config)
from dsarl.launch.distill_report import goal_checks
from dsarl.launch.distill_student import mixed_batch, run_sft, specialist_samples, split_by_weight
from dsarl.launch.grpo_loop import GRPOConfig, PromptData, RolloutConfig
from dsarl.learner.distill import Distiller, Sequences, completion_log_probs
from dsarl.learner.metrics import MetricsLogger, read_metrics
from dsarl.models import ByteTokenizer, DSAConfig, build_model, from_pretrained, save_pretrained
from dsarl.rewards.combiner import RewardCombiner
from dsarl.rewards.config import RewardConfig
from dsarl.rewards.types import RewardSample
from fresh_seeds import fresh_seed

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a cluster another process started
    yield
    ray.shutdown()


def save_tiny(path, seed):
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4)
    save_pretrained(build_model(cfg, seed=seed), path)
    return str(path)


# ---- domains --------------------------------------------------------------------------------------
def _score(domain, row, completion):
    cfg = RewardConfig(components=list(DOMAINS[domain].rewards))
    return RewardCombiner(cfg).score([RewardSample(prompt=row["prompt"], completion=completion,
                                                   num_tokens=len(completion) + 1,  # + eos
                                                   row=row)])[0][0]


def test_each_domain_rewards_its_reference_answer_and_rejects_a_wrong_one():
    for name, d in DOMAINS.items():
        row = max(make_rows(d.task, 50, 0, "test", **d.task_kwargs), key=lambda r: len(r["answer"]))  # longest
        good = _score(name, row, row["answer"] + "\n")
        bad = _score(name, row, "f=lambda x:0*x+1000\n" if name == "code" else "99999")
        assert good[d.accuracy_component] == 1.0 and good["total"] > 0.5, (name, good)
        assert bad[d.accuracy_component] == 0.0 and bad["total"] < 0.5, (name, bad)


def test_code_domain_is_checked_by_running_the_program():
    row = make_rows("code_lambda", 1, 3, "test")[0]
    b = int(row["prompt"].split()[0].split("=")[1])
    a = int(row["prompt"].split()[1].split("=")[1]) - b
    other_form = f"f=lambda x:{b}+x*{a}"  # not the reference text, same function
    wrong_off_the_two_points = f"f=lambda x:{b}+{a}*x*x"  # agrees on f(0), f(1), not on the hidden point
    assert _score("code", row, other_form)["code_tests"] == 1.0
    assert _score("code", row, wrong_off_the_two_points)["code_tests"] == 0.0
    # the formula form states the same line: the prompt's coefficients are the reference program's
    for row in make_rows("code_lambda", 20, 4, "test", given="formula"):
        a, b = row["prompt"].strip()[len("f(x)="):].split("x+")
        assert row["answer"] == f"f=lambda x:{a}*x+{b}" and _score("code", row, row["answer"])["code_tests"] == 1.0


def test_mixed_task_draws_every_domain_by_weight_with_its_kwargs():
    rng = random.Random(0)
    rows = [mixed(rng, domains={"math": {}, "retrieval": {"context_len": 64}}, weights={"math": 3, "retrieval": 1})
            for _ in range(2000)]
    counts = Counter(r["domain"] for r in rows)
    assert set(counts) == {"math", "retrieval"} and 0.7 < counts["math"] / 2000 < 0.8
    assert all(r["context_len"] == 64 for r in rows if r["domain"] == "retrieval")


def test_specialist_config_takes_the_domains_task_rewards_and_overrides():
    cfg = load_config(DistillConfig, CONFIGS / "distill.yaml")
    assert [e.name for e in cfg.domains] == ["math", "code", "retrieval"]
    entry = DomainEntry("retrieval", task_kwargs={"context_len": 96}, grpo_overrides=["steps=3"])
    g = specialist_config(cfg, entry, "BASE")
    assert g.data.task == "passkey" and g.data.task_kwargs["context_len"] == 96 and g.data.task_kwargs["n_needles"] == 4
    assert g.accuracy_component == "exact_match" and [c.name for c in g.rewards.components] == ["exact_match", "overlong"]
    assert g.steps == 3 and g.init_from == "BASE" and g.run_dir.endswith("specialists/retrieval")


# ---- rejection sampling and mixing ------------------------------------------------------------------
class FakeTeachers:
    def generate(self, domain, prompt_ids, params):
        return [Completion(prompt_index=i, sample_index=s, prompt_ids=p, token_ids=[10 + s, 2],
                           logprobs=[-1.0, -1.0], finish_reason="stop", text=str(s), weight_version=0)
                for i, p in enumerate(prompt_ids) for s in range(params.n)]


class FakeRewards:
    """total = a fixed value per sample index: 0.5 exactly, below and above the threshold."""

    def score(self, samples):
        totals = {0: 0.2, 1: 0.5, 2: 0.51, 3: 1.1}
        return [{"acc": float(totals[s.sample_index] > 0.5), "total": totals[s.sample_index]} for s in samples], {}


def test_rejection_sampling_keeps_exactly_the_samples_above_the_threshold(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": "x", "id": f"r{i}"} for i in range(5)]
    dom = DomainData("toy", rows, [], [], FakeRewards(), "acc", 4)
    sft = SFTConfig(samples_per_prompt=4, reward_threshold=0.5)
    kept, m = specialist_samples(FakeTeachers(), dom, ByteTokenizer(), 6, sft, seed=0, out_dir=tmp_path)
    assert m["sft_data/toy/samples"] == 24 and m["sft_data/toy/kept"] == 12 == len(kept)
    assert sorted({c[0] for _, c in kept}) == [12, 13]  # sample indices 2 and 3: totals 0.51 and 1.1
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "toy.parquet").to_pylist()
    assert [json.loads(r["metadata"])["kept"] for r in table] == [r["reward"] > 0.5 for r in table]


def test_split_by_weight_and_mixed_batches_follow_the_weights():
    assert split_by_weight(10, {"a": 1, "b": 1, "c": 3}) == {"a": 2, "b": 2, "c": 6}
    assert sum(split_by_weight(7, {"a": 1, "b": 1, "c": 1}).values()) == 7
    pools = {"a": [([1], [100])], "b": [([1], [200])], "c": []}  # c kept nothing: its share goes to the others
    batch = mixed_batch(pools, {"a": 3, "b": 1, "c": 5}, 8, random.Random(0))
    assert Counter(c[0] for c in batch.completions) == {100: 6, 200: 2}


def test_goal_checks():
    acc = {"base": {"m": 0.2}, "specialist:m": {"m": 0.8}, "student": {"m": 0.75}}
    assert [ok for _, ok in goal_checks(acc, ["m"])] == [True, True]
    acc["student"]["m"] = 0.74
    assert [ok for _, ok in goal_checks(acc, ["m"])] == [False, True]


# ---- routing -----------------------------------------------------------------------------------------
def test_route_by_domain():
    assert route_by_domain(["b", "a", "b", "c", "a"]) == {"b": [0, 2], "a": [1, 4], "c": [3]}


def test_each_prompt_is_scored_by_its_own_domains_teacher(ray_local, tmp_path):
    ckpts = {"math": save_tiny(tmp_path / "m", 1), "code": save_tiny(tmp_path / "c", 2)}
    teachers = TeacherPool(ckpts, num_workers=2, num_cpus_per_worker=0.25)
    try:
        domains = ["code", "math", "math", "code", "math"]
        prompts = [[1, 10 + i] for i in range(5)]
        completions = [[20 + i, 21, 2][: 1 + i % 3] for i in range(5)]
        got = teachers.log_probs(domains, prompts, completions)
        for d, p, c, g in zip(domains, prompts, completions, got):
            own = completion_log_probs(from_pretrained(ckpts[d])[0], Sequences([p], [c]))[0]
            other = completion_log_probs(from_pretrained(ckpts["math" if d == "code" else "code"])[0],
                                         Sequences([p], [c]))[0]
            assert torch.allclose(g, own, atol=1e-5) and not torch.allclose(g, other, atol=1e-3)
        with pytest.raises(ValueError, match="no teacher"):
            teachers.log_probs(["retrieval"], prompts[:1], completions[:1])
    finally:
        teachers.shutdown()


# ---- end to end --------------------------------------------------------------------------------------
def test_small_distill_run_writes_the_report(ray_local, tmp_path):
    base = save_tiny(tmp_path / "base", 0)
    cfg = DistillConfig(
        run_dir=str(tmp_path / "run"), base=base,
        domains=[DomainEntry("math", task_kwargs={"max_digits": 1}), DomainEntry("code", checkpoint=save_tiny(tmp_path / "c", 2)),
                 DomainEntry("retrieval", task_kwargs={"context_len": 32}, checkpoint=save_tiny(tmp_path / "r", 3))],
        specialist=GRPOConfig(data=PromptData(num_train=16, num_test=8),
                              rollout=RolloutConfig(num_cpus_per_worker=0.25, max_batch_size=16),
                              steps=1, prompts_per_step=2, group_size=2, save_every=1, learner_num_cpus=0.5,
                              write_rollouts=False),
        sft=SFTConfig(prompts=6, samples_per_prompt=2, reward_threshold=-1.0, steps=2, batch_size=4, min_samples=1),
        opd=OPDConfig(steps=2, prompts_per_step=3, samples_per_prompt=2, sft_coef=0.5, eval_every=2),
        eval_samples=4, num_validation=3, max_batch_size=16)
    cfg.specialist.rewards.num_cpus_per_worker = 0.25
    results = run_distill(cfg, show_progress=False)
    root = tmp_path / "run"
    for f in ("report.md", "accuracy.png", "results.json", "student/final/model.safetensors",
              "specialists/math/final/config.json", "student/sft_data/code.parquet"):
        assert (root / f).exists(), f
    assert list(results["accuracy"]) == ["base", "specialist:math", "specialist:code", "specialist:retrieval",
                                         "student"]
    assert all(set(row) == {"math", "code", "retrieval"} for row in results["accuracy"].values())
    assert set(results["grpo_evals"]) == {"math"}  # code and retrieval came as checkpoints
    report = (root / "report.md").read_text()
    assert "| student |" in report and "accuracy.png" in report
    phases = [json.loads(line)["phase"] for line in (root / "student" / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["sft", "sft", "opd-validation", "opd", "opd", "opd-validation"]  # validated before and after
    last = json.loads((root / "student" / "metrics.jsonl").read_text().splitlines()[-2])
    assert last["opd/reverse_kl"] >= 0 and "sft/loss" in last  # sft_coef > 0: both terms in one step


def test_mixed_pretraining_reads_each_domains_document_with_its_kwargs():
    from dsarl.data.retrieval_docs import document_segments
    from dsarl.launch.distill_pipeline import mixed_pretrain_kwargs

    entries = [DomainEntry("math", task_kwargs={"ops": "+"}), DomainEntry("retrieval")]
    kw = mixed_pretrain_kwargs(entries, {"weights": {"math": 3}})
    assert kw["parts"]["math"] == {"document": "arithmetic", "weight": 3.0,
                                   "kwargs": {**DOMAINS["math"].task_kwargs, "ops": "+"}}
    assert kw["parts"]["retrieval"]["document"] == "passkey_multi_query"
    rng = random.Random(fresh_seed())
    docs = ["".join(t for t, _ in document_segments("mixture", rng, kw)) for _ in range(400)]
    math_docs = [d for d in docs if "=" in d]
    assert 250 < len(math_docs) < 350  # 3:1 of 400
    assert all("-" not in d for d in math_docs)  # the entry's ops override
    for d in docs:
        if "?" in d:  # every needle asked once, each answered by its own value
            hay, *queries = d.rstrip("\n").split("\n?")
            assert 1 <= len(queries) <= DOMAINS["retrieval"].task_kwargs["n_needles"]
            assert len({q[0] for q in queries}) == len(queries)
            for q in queries:
                assert f" {q[0]}{q[1:]} " in f" {hay} "
    with pytest.raises(ValueError, match="weights"):
        mixed_pretrain_kwargs(entries, {"weights": {"cod": 1}})


def test_sft_shows_a_progress_bar_of_its_steps(tmp_path, capsys):
    model, _ = from_pretrained(save_tiny(tmp_path / "student", seed=0))
    pools = {"math": [([256, 49, 43, 49, 61], [50, 257]), ([256, 50, 43, 50, 61], [52, 257])]}
    sft = SFTConfig(steps=3, batch_size=2)
    logger = MetricsLogger(tmp_path / "run", tensorboard=False)
    assert run_sft(Distiller(model, sft.optim), pools, {"math": 1.0}, sft, 0, logger, 0, show_progress=True) == 3
    logger.close()
    err = capsys.readouterr().err
    assert "distill sft: 100%" in err and "3/3" in err and "loss=" in err
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    quiet = MetricsLogger(tmp_path / "quiet", tensorboard=False)
    run_sft(Distiller(model, sft.optim), pools, {"math": 1.0}, sft, 0, quiet, 0, show_progress=False)
    assert "distill sft" not in capsys.readouterr().err
