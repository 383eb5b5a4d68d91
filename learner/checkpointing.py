"""Training checkpoints: the model checkpoint (HF layout) plus optimizer and trainer state, written
atomically as `RUN_DIR/checkpoints/step_NNNNNN/`. A directory under that name is always complete
(temp dir + rename), so resume simply takes the newest one.

Two kinds of training state sit beside the model files (config.json, model.safetensors, tokenizer,
which rollout workers and `from_pretrained` read, and trainer_state.json + rng.pt, which the driver reads):
- `optimizer.pt` (save_training_checkpoint): one process's optimizer state dict (pretrain, conversion).
- `dcp/` (save_sharded_checkpoint, the GRPO learner on any number of ranks): the model and AdamW state as
  `torch.distributed.checkpoint` writes them, every rank its own shards, keyed by parameter name, so any
  number of ranks resumes any other (load_sharded_state). The safetensors beside it are gathered to rank
  0 one tensor at a time. With several ranks on several machines the run directory must be shared.
"""
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from dsarl.models import ByteTokenizer, atomic_directory_write, save_pretrained
from dsarl.models.checkpoint import NonFiniteWeightsError, remove_partial_writes
from dsarl.models.hf_io import write_state

CHECKPOINTS = "checkpoints"
SHARDED_STATE = "dcp"  # the torch.distributed.checkpoint directory inside a checkpoint


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


def has_sharded_state(path: str | Path) -> bool:
    return (Path(path) / SHARDED_STATE).is_dir()


def _share(obj, rank: int):
    """Rank 0's obj, on every rank of the default group (itself without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank0(fn, rank: int):
    """fn() on rank 0; its result, or the exception it raised, reaches every rank."""
    out = None
    if rank == 0:
        try:
            out = fn()
        except Exception as e:  # raised on every rank below, so none waits in a later collective
            out = e
    out = _share(out, rank)
    if isinstance(out, Exception):
        raise out
    return out


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)  # keyed by parameter name: loadable under any sharding
    return {"model": msd, "optim": osd}


def write_exported_model(directory: Path, config, state: dict, tokenizer=None) -> None:
    """config.json, model.safetensors and the tokenizer from a full CPU state dict: the files
    models.save_pretrained writes for a model with this config and state. Refuses NaN/inf weights."""
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: safetensors stores no shared tensors; HF does the same
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(f"{len(bad)} of {len(state)} tensors hold NaN or inf (first: {bad[:3]}); "
                                    f"not saving")
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    write_state(directory, state, None)
    (tokenizer or ByteTokenizer()).save(directory)


def export_pretrained(directory: str | Path, config, items, tokenizer=None, rank: int = 0) -> Path | None:
    """The HF checkpoint of a (possibly sharded) model, written atomically by rank 0. items: its
    full_state_items generator, which every rank must pass (the gather is collective). -> the directory
    on rank 0, None on the others."""
    state = dict(items)  # rank 0: the full model, gathered one tensor at a time; others: {}
    if rank != 0:
        return None
    return atomic_directory_write(directory, lambda tmp: write_exported_model(tmp, config, state, tokenizer))


def save_sharded_checkpoint(run_dir, step: int, model, optimizer, items, config, tokenizer, state: dict,
                            rank: int = 0, keep: int = 2) -> Path:
    """Every rank calls it (collective). The model and optimizer shards go to `dcp/` through
    torch.distributed.checkpoint; items (the model's full_state_items) is gathered to rank 0, which writes
    the HF model files, trainer_state.json and rng.pt, and swaps the directory in atomically. A failure on
    any rank raises on every rank and leaves the previous checkpoints as they were."""
    import torch.distributed.checkpoint as dcp

    directory = checkpoint_dir(run_dir, step)
    full_state = {**state, "step": step}

    def staging() -> Path:  # shared by all ranks; its name matches what remove_partial_writes clears
        directory.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-dcp-", dir=directory.parent))

    stage = _rank0(staging, rank)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(stage / SHARDED_STATE))
        weights = dict(items)  # collective gather; only rank 0 keeps anything
    except BaseException:
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
        raise

    def finish() -> Path:
        try:
            rng = {"torch": torch.get_rng_state()}

            def write(tmp: Path):
                write_exported_model(tmp, config, weights, tokenizer)
                (stage / SHARDED_STATE).rename(tmp / SHARDED_STATE)
                torch.save(rng, tmp / "rng.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=2))

            path = atomic_directory_write(directory, write)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        remove_partial_writes(Path(run_dir) / CHECKPOINTS)  # left by a run killed mid-save
        return path

    return _rank0(finish, rank)


def load_sharded_state(path: str | Path, model, optimizer) -> None:
    """Loads `dcp/` (any number of ranks wrote it) into this rank's model and optimizer shards. Every rank
    calls it. Trainer state and RNG: load_training_state(path)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    source = Path(path) / SHARDED_STATE
    if not source.is_dir():
        raise FileNotFoundError(f"{path} has no {SHARDED_STATE}/ (sharded model and optimizer state)")
    state = _dcp_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(source))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
