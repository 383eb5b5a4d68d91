"""The learner's FSDP options and sharded checkpoints in one process (the 2-rank cases run on Ray in
tests/actors/test_learner_group.py): activation checkpointing recomputes and keeps the step, bf16 autocast
stays close with fp32 master weights, full_state_items is the state dict, and dcp/ checkpoints resume
exactly, refuse non-finite weights and leave nothing half-written."""
import dataclasses
import os
import random
import stat

import pytest
import torch
from tiny_groups import random_groups, small_cfg

from dsarl.actors.learner_actor import Learner
from dsarl.learner.checkpointing import list_checkpoints, save_training_checkpoint
from dsarl.learner.fsdp import FSDPConfig, apply_activation_checkpointing
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig
from dsarl.learner.grpo_loss import GRPOLossConfig
from dsarl.learner.optim import OptimConfig
from dsarl.models import build_model, from_pretrained, save_pretrained
from dsarl.models.checkpoint import NonFiniteWeightsError

OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_activation_checkpointing_recomputes_each_layer_and_keeps_the_step(attention):
    groups = random_groups(random.Random(1), P=3, G=2, sampler_logp=-2.0)
    cfg = LearnerConfig(optim=OPTIM, micro_batch_groups=2)
    plain, ckpt = (build_model(small_cfg(attention=attention), seed=0) for _ in range(2))
    apply_activation_checkpointing(ckpt)
    calls = []
    # a pre-hook: the recomputation stops (early) once it has rebuilt what backward needs, before the MLP returns
    ckpt.model.layers[1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    m_plain = GRPOLearner(plain, None, cfg).update(groups)
    m_ckpt = GRPOLearner(ckpt, None, cfg).update(groups)
    # 2 micro-batches x (prompt + completions) forwards, each run again in backward
    assert len(calls) == 2 * 2 * 2
    assert m_ckpt["loss"] == pytest.approx(m_plain["loss"], rel=1e-6)
    assert m_ckpt["grad_norm"] == pytest.approx(m_plain["grad_norm"], rel=1e-6)
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=k)


def test_bf16_autocast_is_close_to_fp32_and_keeps_fp32_weights():
    groups = random_groups(random.Random(2), P=2, G=3, sampler_logp=-2.0)
    fp32, bf16 = build_model(small_cfg(), seed=0), build_model(small_cfg(), seed=0)
    m32 = GRPOLearner(fp32, None, LearnerConfig(optim=OPTIM)).update(groups)
    learner = GRPOLearner(bf16, None, LearnerConfig(optim=OPTIM, fsdp=FSDPConfig(mixed_precision="bf16")))
    m16 = learner.update(groups)
    assert m16["loss"] == pytest.approx(m32["loss"], rel=0.05, abs=2e-3)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(v.dtype == torch.float32 for s in learner.optimizer.state.values() for v in s.values()
               if v.dim() > 0)  # AdamW moments in fp32
    with pytest.raises(ValueError, match="mixed_precision"):
        GRPOLearner(build_model(small_cfg(), seed=0), None, LearnerConfig(fsdp=FSDPConfig(mixed_precision="fp16")))


def test_full_state_items_on_one_rank_is_a_copy_of_the_state_dict():
    model = build_model(small_cfg(), seed=3)
    items = list(GRPOLearner(model, None, LearnerConfig()).full_state_items())
    assert [k for k, _ in items] == list(model.state_dict().keys())
    for (k, v), ref in zip(items, model.state_dict().values()):
        assert torch.equal(v, ref) and v.device.type == "cpu", k
        assert v.data_ptr() != ref.data_ptr(), k  # a copy: the next step does not change what was published


def learner_pair(tmp_path, **kw):
    save_pretrained(build_model(small_cfg(), seed=5), tmp_path / "init")
    cfg = LearnerConfig(optim=OPTIM, loss=GRPOLossConfig(beta=0.05), mini_batches=2, micro_batch_groups=1, **kw)
    rng = random.Random(5)
    return cfg, random_groups(rng, P=3, G=2, sampler_logp=-2.0), random_groups(rng, P=3, G=2, sampler_logp=-2.0)


def test_a_sharded_checkpoint_on_one_rank_resumes_with_the_same_next_step(tmp_path):
    cfg, first, second = learner_pair(tmp_path)
    cont = Learner(str(tmp_path / "init"), cfg, total_updates=4)
    cont.update(first)
    ckpt = cont.save(str(tmp_path / "run"), 1, {"step": 1})
    assert {p.name for p in (tmp_path / "run" / "checkpoints" / "step_000001").iterdir()} >= {
        "dcp", "config.json", "model.safetensors", "trainer_state.json", "rng.pt"}
    loaded, _ = from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), cont.policy.state_dict().values()))
    m_cont = cont.update(second)
    resumed = Learner(str(tmp_path / "init"), cfg, resume_from=ckpt, total_updates=4)
    assert resumed.learner.version == 1 and resumed.learner.optimizer_steps == 2
    m_res = resumed.update(second)
    assert m_res["loss"] == m_cont["loss"] and m_res["grad_norm"] == m_cont["grad_norm"]
    for (k, a), b in zip(cont.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k  # bit-identical: the AdamW moments came back exactly


def test_a_checkpoint_with_optimizer_pt_still_resumes_on_one_rank(tmp_path):
    cfg, first, second = learner_pair(tmp_path)
    cont = Learner(str(tmp_path / "init"), cfg)
    cont.update(first)
    state = {"weight_version": 1, "optimizer_steps": 2}
    old = save_training_checkpoint(tmp_path / "run", 1, cont.policy, cont.tokenizer, cont.learner.optimizer, state)
    m_cont = cont.update(second)
    resumed = Learner(str(tmp_path / "init"), cfg, resume_from=str(old))
    assert resumed.update(second)["loss"] == m_cont["loss"]
    assert all(torch.equal(a, b) for a, b in zip(cont.state_dict().values(), resumed.state_dict().values()))


def test_a_sharded_save_refuses_nonfinite_weights_and_leaves_the_previous_checkpoint(tmp_path):
    cfg, first, _ = learner_pair(tmp_path)
    learner = Learner(str(tmp_path / "init"), cfg)
    learner.update(first)
    learner.save(str(tmp_path / "run"), 1, {"step": 1})
    good = (tmp_path / "run" / "checkpoints" / "step_000001" / "model.safetensors").read_bytes()
    with torch.no_grad():
        learner.policy.model.layers[0].self_attn.kv_a_proj_with_mqa.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="layers.0.self_attn.kv_a_proj_with_mqa.weight"):
        learner.save(str(tmp_path / "run"), 2, {"step": 2})
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]  # no staging or temporary directory left
    assert (root / "step_000001" / "model.safetensors").read_bytes() == good
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(root / "step_000001").st_mode) == 0o777 & ~umask  # as mkdir makes it


def test_keep_prunes_old_sharded_checkpoints(tmp_path):
    cfg, first, _ = learner_pair(tmp_path)
    learner = Learner(str(tmp_path / "init"), dataclasses.replace(cfg, loss=GRPOLossConfig()))
    for step in (1, 2, 3):
        learner.save(str(tmp_path / "run"), step, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000002", "step_000003"]


def test_the_fsdp_options_are_typed_config_keys():
    from dsarl.launch.config import load_config
    from dsarl.launch.grpo_loop import GRPOConfig
    from dsarl.models.config import ConfigError

    cfg = load_config(GRPOConfig, None, ["learner_ranks=2", "learner.fsdp.activation_checkpointing=true",
                                         "learner.fsdp.reference=cpu_offload", "learner.fsdp.mixed_precision=bf16"])
    assert cfg.learner.fsdp == FSDPConfig(activation_checkpointing=True, mixed_precision="bf16",
                                          reference="cpu_offload")
    with pytest.raises(ConfigError, match="learner.fsdp.mixed_precision"):
        load_config(GRPOConfig, None, ["learner.fsdp.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="train_indexer runs on one learner rank only"):
        load_config(GRPOConfig, None, ["learner_ranks=2", "learner.train_indexer=true"])
