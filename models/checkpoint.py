"""Checkpoints in the Hugging Face layout: config.json + model.safetensors + tokenizer files.

Written atomically: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a crash never leaves a half-written checkpoint under the final name.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import DSAConfig
from .model import DTYPES, DSAForCausalLM, is_indexer_weight
from .tokenizer import ByteTokenizer, load_tokenizer


def atomic_directory_write(directory: str | Path, write_fn) -> Path:
    """Calls write_fn(tmp_dir), then swaps tmp_dir into `directory` (replacing any old one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write_fn(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def model_state_for_saving(model: DSAForCausalLM) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: safetensors stores no shared tensors; HF does the same
    return state


def write_model_files(directory: Path, model: DSAForCausalLM, tokenizer=None) -> None:
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    save_file(model_state_for_saving(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (tokenizer or ByteTokenizer()).save(directory)


def save_pretrained(model: DSAForCausalLM, directory: str | Path, tokenizer=None, extra_files=None) -> Path:
    """extra_files: {name: callable(path)} written into the same atomic directory (optimizer, state)."""

    def write(tmp: Path):
        write_model_files(tmp, model, tokenizer)
        for name, fn in (extra_files or {}).items():
            fn(tmp / name)

    return atomic_directory_write(directory, write)


def from_pretrained(directory: str | Path, device=None, new_indexer: bool = False, seed: int | None = None,
                    **config_overrides):
    """-> (model, tokenizer). config_overrides change runtime keys such as attention or index_topk.

    new_indexer: ignore the checkpoint's indexer weights (if any) and start freshly initialised indexers
    (seeded by `seed`), so config_overrides may also change the indexer's shape (index_n_heads,
    index_head_dim). This is DeepSeek-V3.2's conversion: a dense model gets an indexer it never had."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint: config.json is missing")
    cfg = DSAConfig.from_file(directory / "config.json")
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = DSAForCausalLM(cfg)
    state = load_file(str(directory / "model.safetensors"))
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if new_indexer:
        state = {k: v for k, v in state.items() if not is_indexer_weight(k)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if new_indexer:
        missing = [k for k in missing if not is_indexer_weight(k)]
    if missing or unexpected:
        raise ValueError(f"{directory}/model.safetensors: missing weights {missing}, unexpected weights {unexpected}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device, dtype=DTYPES[cfg.torch_dtype])
    return model, load_tokenizer(directory)
