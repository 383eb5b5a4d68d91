"""Training checkpoints: the model checkpoint (HF layout) plus optimizer and trainer state, written
atomically as `RUN_DIR/checkpoints/step_NNNNNN/`. A directory under that name is always complete
(temp dir + rename), so resume simply takes the newest one.
"""
import json
import shutil
from pathlib import Path

import torch

from dsarl.models import save_pretrained
from dsarl.models.checkpoint import remove_partial_writes

CHECKPOINTS = "checkpoints"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (what --resume takes); half-written ones are cleared first."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        remove_partial_writes(root)
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resume_from(run_dir: str | Path, resume: bool | str) -> Path | None:
    """The checkpoint a run resumes from: `resume` a path names it, True means the newest in run_dir."""
    if isinstance(resume, str):
        return Path(resume)
    return latest_checkpoint(run_dir) if resume else None


def save_training_checkpoint(run_dir, step: int, model, tokenizer, optimizer, state: dict, keep: int = 2,
                             extra_files: dict | None = None) -> Path:
    """state: JSON-able trainer state (step, data position, metrics...); RNG states are added here."""
    full_state = {**state, "step": step}
    rng = {"torch": torch.get_rng_state()}

    files = {
        "optimizer.pt": lambda p: torch.save(optimizer.state_dict(), p),
        "rng.pt": lambda p: torch.save(rng, p),
        "trainer_state.json": lambda p: p.write_text(json.dumps(full_state, indent=2)),
        **(extra_files or {}),
    }
    path = save_pretrained(model, checkpoint_dir(run_dir, step), tokenizer, extra_files=files)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    remove_partial_writes(Path(run_dir) / CHECKPOINTS)  # left by a run killed mid-save
    return path


def load_training_state(path: str | Path, optimizer=None) -> dict:
    """Restores optimizer and RNG state from a checkpoint dir; returns the trainer state dict.
    (The model weights are loaded by from_pretrained or load_model_weights.)"""
    path = Path(path)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng_file = path / "rng.pt"
    if rng_file.exists():
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return json.loads((path / "trainer_state.json").read_text())


def load_model_weights(model, path: str | Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "model.safetensors"))
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
