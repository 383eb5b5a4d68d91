"""The FSDP2 learner on a MoE model: 2 ranks (gloo) take 1 rank's step although each routes its tokens to
different experts (unused experts reduce zeros), and their routing metrics cover the whole batch, like 1
rank's, not rank 0's shard."""
import random

import pytest
import ray
import torch

from dsarl.actors.learner_group import LearnerGroup
from dsarl.data.step_types import GroupSample
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.models import DSAConfig, build_model, save_pretrained


def test_two_ranks_report_the_whole_batchs_routing_metrics(tmp_path):
    cfg = DSAConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4, n_routed_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=16, first_k_dense_replace=1)
    save_pretrained(build_model(cfg, seed=0), tmp_path / "init")
    rng, g = random.Random(5), torch.Generator().manual_seed(5)
    groups = []
    for _ in range(5):  # odd: the ranks get unequal shards
        prompt = [rng.randrange(256) for _ in range(rng.randint(2, 8))]
        comps = [[rng.randrange(256) for _ in range(rng.randint(1, 6))] for _ in range(2)]
        shared = torch.rand(len(prompt), 1, 4, generator=g).argsort(-1)[..., :2]  # [P, M, k] one prefill
        experts = [torch.cat([shared, torch.rand(len(c) - 1, 1, 4, generator=g).argsort(-1)[..., :2]]).to(torch.uint8)
                   for c in comps]  # random routing: most of it differs from the model's own
        groups.append(GroupSample(prompt, comps, [[-2.0] * len(c) for c in comps], [1.0, -1.0], experts=experts))
    lcfg = LearnerConfig(use_sampler_experts=False, micro_batch_groups=1)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        metrics, states = {}, {}
        for n in (1, 2):
            group = LearnerGroup(n, str(tmp_path / "init"), lcfg, seed=0, num_cpus=0.5, num_threads=1)
            metrics[n] = group.update(groups)
            states[n] = group.state_dict()
            group.shutdown()
    finally:
        ray.shutdown()
    keys = ("moe/load_max", "moe/load_mean", "moe/load_max/layer_1", "moe/routing_mismatch")
    assert 0 < metrics[1]["moe/routing_mismatch"] < 1
    for k in keys:
        assert metrics[2][k] == pytest.approx(metrics[1][k], rel=1e-12), k
    assert metrics[2]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5, abs=1e-7)
    for k, v in states[1].items():  # AdamW: 1e-3 of the LR is the float tolerance of one step
        torch.testing.assert_close(states[2][k], v, rtol=1e-5, atol=1e-5, msg=k)
