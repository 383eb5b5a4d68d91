"""A GRPO step of a MoE model on a local Ray instance: the driver asks the engine for the routing, the
Parquet rollouts keep it, the learner reports the routing metrics."""
import json

import pytest
import ray

from dsarl.data.rollout_schema import read_rollouts, table_to_completions
from dsarl.launch.grpo_loop import GRPOConfig, GRPOTrainer, PromptData, RolloutConfig
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.models import DSAConfig, build_model, save_pretrained
from dsarl.rewards.config import RewardComponentConfig, RewardConfig


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    cfg = DSAConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4, n_routed_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=16, first_k_dense_replace=1)
    path = tmp_path_factory.mktemp("init") / "moe"
    save_pretrained(build_model(cfg, seed=0), path)
    return str(path)


def test_moe_step_records_routing_and_reports_mismatch_with_replay_off(moe_checkpoint, tmp_path):
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg = GRPOConfig(
            init_from=moe_checkpoint, run_dir=str(tmp_path), steps=1, prompts_per_step=2, group_size=2,
            save_every=10**9, eval_samples=0, tensorboard=False,
            data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=8, num_test=0),
            rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=3, max_batch_size=4),
            rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer")], num_cpus_per_worker=0.25),
            learner=LearnerConfig(use_sampler_experts=False), learner_num_cpus=0.5)
        trainer = GRPOTrainer(cfg)
        try:
            # replay off still records (native engine): the mismatch metric needs the sampler's routing
            assert trainer.sampling(0, 2).return_experts and not trainer.sampling(0, 1, greedy=True).return_experts
            metrics = trainer.step(0)
        finally:
            trainer.shutdown()
    finally:
        ray.shutdown()
    assert metrics["moe/routing_mismatch"] == pytest.approx(0.0, abs=0.05)  # same weights, up to near-ties
    assert metrics["moe/load_max"] >= 1.0 and "moe/load_max/layer_1" in metrics
    comps = table_to_completions(read_rollouts(tmp_path / "rollouts" / "step_000001.parquet"))
    assert len(comps) == 4
    for c in comps:
        assert c.experts.shape == (len(c.prompt_ids) + len(c.token_ids) - 1, 1, 2)
    json.dumps(metrics)  # metrics stay plain floats
