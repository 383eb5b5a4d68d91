"""Checkpoints in the Hugging Face layout: config.json + model.safetensors (or shards + index) + tokenizer files.

What transformers saves for deepseek_v32 / glm_moe_dsa loads here (and deepseek_v3, dense MLA without an
indexer: the indexer is then initialised fresh and the config records `converted_from`); what we save
loads in transformers' AutoConfig / AutoModelForCausalLM / AutoTokenizer unchanged.

Written atomically: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a crash never leaves a half-written checkpoint under the final name.
"""
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from .config import DSAConfig
from .hf_io import read_state, write_state
from .model import DTYPES, DSAForCausalLM, is_indexer_weight
from .tokenizer import ByteTokenizer, load_tokenizer


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, read-only storage); the previous one is untouched."""


def _default_dir_mode() -> int:
    """0777 less the process umask: what mkdir gives, so a team sharing the storage can read it
    (mkdtemp's 0700 would make every checkpoint private to its writer)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _describe_write_error(directory: Path, e: BaseException) -> str | None:
    """A plain sentence for a storage failure, or None for other errors (bugs keep their traceback)."""
    text = str(e)
    full = ("No space left on device", "unexpected pos", "file write failed")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or any(f in text for f in full):
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos",
        # safetensors as a SafetensorError "... No space left on device (os error 28)"
        free = shutil.disk_usage(directory.parent).free
        return f"no space left on device while writing {directory} ({free} bytes free): {text.splitlines()[0]}"
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {directory}: {os.strerror(e.errno)}"
    return None


def remove_partial_writes(parent: str | Path) -> int:
    """Removes the temporary directories of writes that never finished (a crash mid-save) under parent.
    Call only where no save is running. Returns how many were removed."""
    parent = Path(parent)
    stale = [p for p in parent.glob(".*.tmp-*") if p.is_dir()] + [p for p in parent.glob(".*.old-*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def atomic_directory_write(directory: str | Path, write_fn) -> Path:
    """Calls write_fn(tmp_dir), then swaps tmp_dir into `directory` (replacing any old one). A storage
    failure raises CheckpointWriteError saying what happened; nothing under `directory` changes."""
    directory = Path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    except OSError as e:
        raise CheckpointWriteError(e.errno, _describe_write_error(directory, e) or str(e)) from e
    try:
        write_fn(tmp)
        os.chmod(tmp, _default_dir_mode())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        message = _describe_write_error(directory, e)
        if message is not None:
            raise CheckpointWriteError(getattr(e, "errno", None) or errno.EIO, message) from e
        raise
    return directory


class NonFiniteWeightsError(ValueError):
    """A model with NaN or inf weights is never saved: it would replace a good checkpoint."""


def model_state_for_saving(model: DSAForCausalLM) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: safetensors stores no shared tensors; HF does the same
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(f"{len(bad)} of {len(state)} tensors hold NaN or inf (first: {bad[:3]}); "
                                    f"not saving")
    return state


def write_model_files(directory: Path, model: DSAForCausalLM, tokenizer=None,
                      max_shard_bytes: int | None = None) -> None:
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    write_state(directory, model_state_for_saving(model), max_shard_bytes)
    (tokenizer or ByteTokenizer()).save(directory)


def save_pretrained(model: DSAForCausalLM, directory: str | Path, tokenizer=None, extra_files=None,
                    max_shard_bytes: int | None = None) -> Path:
    """extra_files: {name: callable(path)} written into the same atomic directory (optimizer, state).
    max_shard_bytes: split the weights into shards of at most this size (plus model.safetensors.index.json)."""

    def write(tmp: Path):
        write_model_files(tmp, model, tokenizer, max_shard_bytes)
        for name, fn in (extra_files or {}).items():
            fn(tmp / name)

    return atomic_directory_write(directory, write)


def from_pretrained(directory: str | Path, device=None, new_indexer: bool = False, seed: int | None = None,
                    **config_overrides):
    """-> (model, tokenizer). config_overrides change runtime keys such as attention or index_topk.

    new_indexer: ignore the checkpoint's indexer weights (if any) and start freshly initialised indexers
    (seeded by `seed`), so config_overrides may also change the indexer's shape (index_n_heads,
    index_head_dim). This is DeepSeek-V3.2's conversion: a dense model gets an indexer it never had; a
    deepseek_v3 checkpoint always takes this path (seed 0 unless given)."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint: config.json is missing")
    cfg = DSAConfig.from_file(directory / "config.json")
    if json.loads((directory / "config.json").read_text()).get("model_type") == "deepseek_v3":
        new_indexer, seed = True, 0 if seed is None else seed  # no indexer to load: a fresh one, seeded all the same
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    if seed is not None:
        torch.manual_seed(seed)
    # cast before loading, so weights kept in fp32 (router, indexer head weights) load without a round trip
    model = DSAForCausalLM(cfg).to(dtype=DTYPES[cfg.torch_dtype]).keep_fp32_()
    state = read_state(directory, cfg.num_hidden_layers)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if new_indexer:
        state = {k: v for k, v in state.items() if not is_indexer_weight(k)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if new_indexer:
        missing = [k for k in missing if not is_indexer_weight(k)]
    if missing or unexpected:
        raise ValueError(f"{directory}: missing weights {missing}, unexpected weights {unexpected}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device), load_tokenizer(directory)
