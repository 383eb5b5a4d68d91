"""Partial rollouts (rollout.partial_rollouts) on a real local Ray instance and the tiny model: a weight
sync reaches a generation in flight, whose tokens then carry two versions, each token's log-prob being
the one its version's weights give; the option off leaves the run as it was; bad configs fail naming
the key."""
import json
import time

import pyarrow.parquet as pq
import pytest
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.actors.rollout_workers import RolloutPool
from dsarl.launch.config import load_config
from dsarl.launch.grpo_loop import GRPOConfig, PromptData, RolloutConfig, run_grpo
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.models import build_model, from_pretrained
from dsarl.models.config import ConfigError
from dsarl.rewards.config import RewardComponentConfig, RewardConfig

DETERMINISTIC = ("reward/mean", "accuracy", "response_length/mean", "loss", "entropy", "grad_norm", "weight_version",
                 "staleness/max", "staleness/mean")


def local_engine(init, state=None, version=0) -> NativeEngine:
    model, tok = from_pretrained(init)
    engine = NativeEngine(model.requires_grad_(False), tok)
    if state is not None:
        engine.load_weights(state, version)
    return engine


def test_a_weight_sync_reaches_a_generation_in_flight(ray_local, init_checkpoint):
    pool = RolloutPool(1, init_checkpoint, num_cpus_per_worker=0.25, num_threads=1,
                       engine_kwargs={"max_batch_size": 4}, partial_rollouts=True)
    try:
        old = local_engine(init_checkpoint)
        new_state = build_model(old.cfg, seed=1).state_dict()  # version 1: other weights of the same shapes
        prompts = [old.tokenizer.encode("3+4=", add_bos=True)]
        params = SamplingParams(max_new_tokens=1500, n=2, seed=3, ignore_eos=True)
        refs = pool.submit_generate(prompts, params)
        time.sleep(0.5)  # the generation must have started (it runs for seconds): the sync must find it in flight
        assert pool.sync_weights(new_state, 1) == [1]  # staged while the generate call still runs
        comps = pool.collect(refs)
        new = local_engine(init_checkpoint, new_state, 1)
        for c in comps:
            versions = torch.tensor(c.token_versions)
            assert set(c.token_versions) == {0, 1} and c.token_versions == sorted(c.token_versions)
            assert c.weight_version == 0  # the oldest token's
            logp = torch.tensor(c.logprobs)
            for v, engine in ((0, old), (1, new)):  # each token under the weights of its version, uncached
                ref = torch.tensor(engine.score(c.prompt_ids, c.token_ids, params.temperature))
                torch.testing.assert_close(logp[versions == v], ref[versions == v], rtol=2e-4, atol=2e-4)
        after = pool.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=3, ignore_eos=True))
        assert all(c.token_versions == [1] * 8 for c in after)  # submitted after the sync: new weights only
        assert pool.weight_versions() == [1]
    finally:
        pool.shutdown()


def grpo(init, run_dir, steps=4, **rollout) -> GRPOConfig:
    return GRPOConfig(
        init_from=init, run_dir=str(run_dir), steps=steps, prompts_per_step=4, group_size=4, save_every=100,
        data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=64, num_test=4),
        rollout=RolloutConfig(num_cpus_per_worker=0.25, max_batch_size=16, max_staleness=1, **rollout),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer")], num_cpus_per_worker=0.25),
        learner=LearnerConfig(mini_batches=4, micro_batch_groups=1),
        learner_num_cpus=0.5, eval_samples=4, tensorboard=False)


def run(cfg: GRPOConfig, run_dir):
    run_grpo(cfg, show_progress=False)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    logs = [pq.read_table(run_dir / "rollouts" / f"step_{s:06d}.parquet").to_pylist() for s in range(1, cfg.steps + 1)]
    return metrics, logs


def test_partial_runs_keep_the_staleness_bound_by_the_oldest_token(ray_local, init_checkpoint, tmp_path):
    metrics, logs = run(grpo(init_checkpoint, tmp_path, max_new_tokens=96, partial_rollouts=True), tmp_path)
    for m, rows in zip(metrics, logs):
        learner_version = m["weight_version"] - 1  # the version the step's batch was trained against
        for r in rows:
            assert r["token_versions"] == sorted(r["token_versions"]) and len(r["token_versions"]) == len(
                r["completion_token_ids"])
            assert r["weight_version"] == r["token_versions"][0]
        # staleness is the oldest token's, and no batch is older than max_staleness
        assert m["staleness/max"] == max(learner_version - r["weight_version"] for r in rows) <= 1
        assert m["staleness/partial_samples"] == sum(len(set(r["token_versions"])) > 1 for r in rows)


def test_off_by_default_gives_the_same_run(ray_local, init_checkpoint, tmp_path):
    absent, _ = run(grpo(init_checkpoint, tmp_path / "absent", max_new_tokens=16), tmp_path / "absent")
    cfg = load_config(GRPOConfig, None, [f"init_from={init_checkpoint}", "rollout.partial_rollouts=false"])
    off_cfg = grpo(init_checkpoint, tmp_path / "off", max_new_tokens=16, partial_rollouts=cfg.rollout.partial_rollouts)
    off, logs = run(off_cfg, tmp_path / "off")
    assert [set(m) for m in off] == [set(m) for m in absent] and not any("staleness/partial_samples" in m for m in off)
    for a, o in zip(absent, off):
        for key in DETERMINISTIC:
            assert o[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    # as the synchronous engine always did: one version per sample, the pattern of max_staleness 1
    assert [{r["weight_version"] for r in rows} for rows in logs] == [{0}, {0}, {1}, {2}]
    assert all(set(r["token_versions"]) == {r["weight_version"]} for rows in logs for r in rows)


@pytest.mark.parametrize("overrides, why", [
    (["rollout.partial_rollouts=true"], r"max_staleness >= 1 \(got 0\)"),
    (["rollout.partial_rollouts=true", "rollout.max_staleness=1", "rollout.engine=vllm"], "engine 'native'"),
])
def test_partial_rollouts_without_what_they_need_is_a_config_error(overrides, why):
    with pytest.raises(ConfigError, match=f"rollout.partial_rollouts needs .*{why}"):
        load_config(GRPOConfig, None, overrides)
