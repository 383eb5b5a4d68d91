"""The FSDP2 learner group on a real local Ray (gloo): 1 rank and 2 ranks take the same step (dense and
sparse attention, and with the sharding options on), each of 2 ranks holds half the parameters and
optimizer state, and a checkpoint written by 2 ranks resumes on 1 with the same next step."""
import dataclasses
import random

import pytest
import ray
import torch
from safetensors.torch import load_file

from dsarl.actors.learner_group import LearnerGroup
from dsarl.learner.fsdp import FSDPConfig
from dsarl.learner.grpo_learner import LearnerConfig
from dsarl.learner.grpo_loss import GRPOLossConfig
from dsarl.learner.optim import OptimConfig
from dsarl.data.step_types import GroupSample
from dsarl.models import DSAConfig, build_model, from_pretrained, save_pretrained

LCFG = LearnerConfig(optim=OptimConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1),
                     loss=GRPOLossConfig(beta=0.05, tis_level="token"), mini_batches=2, micro_batch_groups=1)




def small_cfg():
    return DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                     index_head_dim=16, index_topk=4)


def random_groups(rng: random.Random, P: int, G: int, sampler_logp: float) -> list[GroupSample]:
    """P groups of G completions (1-6 tokens) of random prompts (2-8 tokens), advantages in [-1, 1]."""
    out = []
    for _ in range(P):
        comps = [[rng.randrange(256) for _ in range(rng.randint(1, 6))] for _ in range(G)]
        out.append(GroupSample([rng.randrange(256) for _ in range(rng.randint(2, 8))], comps,
                               [[sampler_logp] * len(c) for c in comps], [rng.uniform(-1, 1) for _ in comps]))
    return out


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def run(n: int, init, lcfg, batches, overrides=None, resume_from=None, after=None):
    """n ranks train on each batch in turn -> (metrics per batch, full state, per-rank local shards, memory,
    what `after(group)` returns)."""
    group = LearnerGroup(n, str(init), lcfg, seed=0, num_cpus=0.5, num_threads=1, model_overrides=overrides,
                         resume_from=resume_from)
    try:
        metrics = [group.update(b) for b in batches]
        extra = after(group) if after else None
        return metrics, group.state_dict(), group.local_state_dicts(), group.memory(), extra
    finally:
        group.shutdown()


def assert_same_step(a, b):
    """AdamW normalises each update, so reduction-order differences of ~1e-7 in tiny gradients show up
    at ~1e-6 in the weights: 1e-3 of the learning rate is the float tolerance of one step."""
    (ma, sa), (mb, sb) = a, b
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-7)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
        assert y["tokens"] == x["tokens"]
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_one_and_two_fsdp_ranks_take_the_same_step(ray_local, tmp_path, attention):
    cfg = small_cfg()
    save_pretrained(build_model(cfg, seed=0), tmp_path / "init")
    batches = [random_groups(random.Random(7), P=5, G=3, sampler_logp=-2.0)]  # 5: the ranks get unequal shards
    over = {"attention": attention}
    m1, s1, local1, mem1, _ = run(1, tmp_path / "init", LCFG, batches, over)
    m2, s2, local2, mem2, _ = run(2, tmp_path / "init", LCFG, batches, over)
    assert_same_step((m1, s1), (m2, s2))
    init = build_model(cfg, seed=0).state_dict()
    assert sum(not torch.equal(v, init[k]) for k, v in s1.items()) > 0  # the step moved the weights
    # the ranks hold different halves, which together are the whole (dim-0 shards)
    w = "model.layers.0.mlp.gate_proj.weight"
    assert local2[0][w].shape[0] + local2[1][w].shape[0] == s2[w].shape[0]
    torch.testing.assert_close(torch.cat([local2[0][w], local2[1][w]]), s2[w], rtol=0, atol=0)
    # memory: each of 2 ranks holds about half of 1 rank's parameters, gradients and AdamW moments
    for key in ("params_numel", "optimizer_numel"):
        whole = mem1[0][key]
        assert mem2[0][key] + mem2[1][key] == whole, key  # shards partition the model exactly
        rows = sum(v.shape[1:].numel() for v in init.values())  # dim-0 rounding: at most a row per tensor
        assert abs(mem2[0][key] - whole / 2) <= rows * (2 if key == "optimizer_numel" else 1), key
    n_trainable = sum(v.numel() for k, v in s1.items() if ".indexer." not in k and k != "lm_head.weight"
                      and not k.endswith("e_score_correction_bias"))
    assert mem1[0]["optimizer_numel"] == 2 * n_trainable  # AdamW: two moments per trainable element


def test_sharding_options_keep_the_step(ray_local, tmp_path):
    """Activation checkpointing and a CPU-offloaded reference change memory, not the step; bf16 autocast
    changes it by rounding only."""
    save_pretrained(build_model(small_cfg(), seed=0), tmp_path / "init")
    batches = [random_groups(random.Random(3), P=3, G=2, sampler_logp=-2.0)]
    over = {"attention": "sparse"}
    plain = run(1, tmp_path / "init", LCFG, batches, over)
    opts = dataclasses.replace(LCFG, fsdp=FSDPConfig(activation_checkpointing=True, reference="cpu_offload"))
    sharded = run(2, tmp_path / "init", opts, batches, over)
    assert_same_step(plain[:2], sharded[:2])
    offloaded = run(1, tmp_path / "init", dataclasses.replace(LCFG, fsdp=FSDPConfig(reference="cpu_offload")),
                    batches, over)  # one rank: the reference behind FSDP's offload on a group of one
    assert_same_step(plain[:2], offloaded[:2])
    bf16 = run(2, tmp_path / "init", dataclasses.replace(LCFG, fsdp=FSDPConfig(mixed_precision="bf16")), batches,
               over)
    assert bf16[0][0]["loss"] == pytest.approx(plain[0][0]["loss"], rel=0.05, abs=2e-3)
    assert all(v.dtype == torch.float32 for v in bf16[1].values() if v.is_floating_point())  # fp32 masters


def test_a_checkpoint_of_two_ranks_resumes_on_one_with_the_same_next_step(ray_local, tmp_path):
    save_pretrained(build_model(small_cfg(), seed=0), tmp_path / "init")
    rng = random.Random(11)
    first, second = random_groups(rng, P=4, G=2, sampler_logp=-2.0), random_groups(rng, P=4, G=2, sampler_logp=-2.0)
    run_dir = tmp_path / "run"

    def save_then_publish(group):
        ckpt = group.save(str(run_dir), 1, {"step": 1})
        return ckpt, group.state_dict()

    _, _, _, _, (ckpt, saved) = run(2, tmp_path / "init", LCFG, [first], after=save_then_publish)
    # the HF files beside the shards are the full model, loadable as rollout workers load it
    model, _ = from_pretrained(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    save_pretrained(model, tmp_path / "reference_save")  # what models.save_pretrained writes for these weights
    ours, theirs = load_file(f"{ckpt}/model.safetensors"), load_file(tmp_path / "reference_save" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    def step_then_publish(group):
        ref, version = group.publish_weights()
        return ray.get(ref).unpack(), version

    cont = run(2, tmp_path / "init", LCFG, [first, second])
    resumed = run(1, tmp_path / "init", LCFG, [second], resume_from=ckpt, after=step_then_publish)
    assert_same_step(([cont[0][1]], cont[1]), (resumed[0], resumed[1]))  # step 2: two ranks, or resumed on one
    published, version = resumed[4]
    assert version == 2 and published.keys() == resumed[1].keys()
    assert all(torch.equal(published[k], v) for k, v in resumed[1].items())
    # and the other way: one rank's checkpoint resumes on two
    _, _, _, _, ckpt1 = run(1, tmp_path / "init", LCFG, [first],
                            after=lambda group: group.save(str(tmp_path / "run1"), 1, {"step": 1}))
    resumed2 = run(2, tmp_path / "init", LCFG, [second], resume_from=ckpt1)
    assert_same_step(([cont[0][1]], cont[1]), resumed2[:2])


def test_two_ranks_refuse_to_save_nonfinite_weights_held_by_rank_1(ray_local, tmp_path):
    def poison_local_shard(learner, name: str) -> int:  # nested: Ray ships it by value to the actor
        """inf into this rank's own shard of a weight."""
        from torch.distributed.tensor import DTensor

        param = dict(learner.policy.named_parameters())[name]
        with torch.no_grad():
            (param.to_local() if isinstance(param, DTensor) else param).view(-1)[0] = float("inf")
        return learner.rank

    save_pretrained(build_model(small_cfg(), seed=0), tmp_path / "init")
    group = LearnerGroup(2, str(tmp_path / "init"), LCFG, seed=0, num_cpus=0.5, num_threads=1)
    try:
        group.update(random_groups(random.Random(4), P=2, G=2, sampler_logp=-2.0))
        group.save(str(tmp_path / "run"), 1, {"step": 1})
        good = (tmp_path / "run" / "checkpoints" / "step_000001" / "model.safetensors").read_bytes()
        name = "model.layers.1.mlp.down_proj.weight"
        assert ray.get(group.ranks[1].__ray_call__.remote(poison_local_shard, name)) == 1
        with pytest.raises(ray.exceptions.RayTaskError, match=f"NaN or inf.*{name}") as raised:
            group.save(str(tmp_path / "run"), 2, {"step": 2})
        assert "NonFiniteWeightsError" in str(raised.value)
        root = tmp_path / "run" / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == ["step_000001"]  # no staging (dcp) directory left
        assert (root / "step_000001" / "model.safetensors").read_bytes() == good
        assert group.weight_version() == 1  # both ranks came back: neither waits in a collective
        assert ray.get(group.ranks[1].weight_version.remote()) == 1
    finally:
        group.shutdown()
