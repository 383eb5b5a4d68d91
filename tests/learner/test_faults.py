"""Faults that must not destroy a model or block a resume (issue #21 items 2, 4, 5, 7), each injected
for real: non-finite advantages, NaN weights, a torn metrics line, a killed save's leftovers, a full
filesystem (a real 1 MB tmpfs where the test may mount one)."""
import json
import os
import random
import stat
import subprocess

import pytest
import torch

from dsarl.data.step_types import GroupSample
from dsarl.learner.checkpointing import latest_checkpoint, save_training_checkpoint
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig, NonFiniteError
from dsarl.learner.metrics import MetricsLogger, read_metrics
from dsarl.models import DSAConfig, build_model, from_pretrained, save_pretrained
from dsarl.models.checkpoint import CheckpointWriteError, NonFiniteWeightsError


def small_model(seed=0):
    return build_model(DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                 v_head_dim=8, index_n_heads=2, index_head_dim=16, index_topk=4), seed=seed)


def groups(advantage: float, seed=0) -> list[GroupSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(2):
        comps = [[rng.randrange(256) for _ in range(3)] for _ in range(2)]
        out.append(GroupSample([rng.randrange(256) for _ in range(4)], comps, [[-1.0] * 3 for _ in comps],
                               [advantage, -advantage]))
    return out


def test_nonfinite_loss_skips_the_step_and_repeated_ones_stop_the_run():
    model = small_model()
    learner = GRPOLearner(model, None, LearnerConfig(max_nonfinite_steps=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    huge = groups(1e39)  # a reward of 1e39 is finite in float64, inf in the float32 advantages
    metrics = learner.update(huge)
    assert metrics["nonfinite_skipped"] == 1.0 and metrics["optimizer_steps"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert learner.update(groups(0.5))["nonfinite_skipped"] == 0.0  # a finite step resets the count
    learner.update(huge)
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        learner.update(huge)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    model = small_model()
    save_pretrained(model, tmp_path / "ckpt")
    good = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="layers.1.mlp.down_proj.weight"):
        save_pretrained(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == good  # the previous one stands
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # and no temporary directory is left


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_resume_goes_on(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(3):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 3.')  # killed mid-write
    with pytest.warns(UserWarning, match="metrics.jsonl: dropping a torn last line 4"):
        assert [m["step"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    with pytest.warns(UserWarning):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=1).close()  # what --resume does
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_killed_save_leaves_nothing_that_survives_the_next_save_and_checkpoints_are_readable(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW(model.parameters())
    save_training_checkpoint(tmp_path, 1, model, None, opt, {})
    torn = tmp_path / "checkpoints" / ".step_000002.tmp-abc123"  # what a SIGKILL mid-save leaves
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 1000)
    assert latest_checkpoint(tmp_path).name == "step_000001"  # --resume clears it and takes the last whole one
    assert not torn.exists()
    torn.mkdir()
    save_training_checkpoint(tmp_path, 2, model, None, opt, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    mode = stat.S_IMODE(os.stat(tmp_path / "checkpoints" / "step_000002").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's private 0700


def mount_tmpfs(path, size_kb: int) -> None:
    """A real filesystem of size_kb (tmpfs); skips the test where this process may not mount one."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")


def test_disk_full_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    small = small_model()
    opt = torch.optim.AdamW(small.parameters())
    small(torch.tensor([[1, 2]])).logits.sum().backward()
    opt.step()
    save_pretrained(small, tmp_path / "probe")
    weights_kb = (tmp_path / "probe" / "model.safetensors").stat().st_size // 1024
    full_disk = tmp_path / "small"
    # room for one model and a half: the second checkpoint (model + 2x-size Adam state) cannot fit
    mount_tmpfs(full_disk, int(weights_kb * 1.5) + 64)
    request_umount = lambda: subprocess.run(["umount", str(full_disk)], check=True)  # noqa: E731
    try:
        _disk_full_case(small, opt, full_disk)
    finally:
        request_umount()


def _disk_full_case(small, opt, full_disk):
    save_pretrained(small, full_disk / "run" / "checkpoints" / "step_000001")
    with pytest.raises(CheckpointWriteError, match="no space left on device while writing .*step_000002"):
        save_training_checkpoint(full_disk / "run", 2, small, None, opt, {})
    reloaded, _ = from_pretrained(full_disk / "run" / "checkpoints" / "step_000001")
    for (k, a), b in zip(small.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in (full_disk / "run" / "checkpoints").iterdir()) == ["step_000001"]
