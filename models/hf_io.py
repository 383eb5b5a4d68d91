"""Weights on disk as Hugging Face writes them: one model.safetensors, or shards listed by
model.safetensors.index.json ({"metadata": {"total_size": bytes}, "weight_map": {name: file}}).

Reading takes either; writing shards only when a size limit asks for it. Checkpoints of the full models
carry extra layers past num_hidden_layers (DeepSeek's multi-token-prediction module, layer 61 of V3.2):
the decoder never runs them, so they are dropped on load, as transformers does.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def read_state(directory: Path, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory; with num_layers, those of layers >= num_layers are left out."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE).exists():
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"{directory}: neither {SINGLE} nor {INDEX} exists")
    state = {}
    for name in files:
        with safe_open(str(directory / name), "pt") as f:
            for key in f.keys():
                m = _LAYER.match(key)
                if num_layers is not None and m is not None and int(m.group(1)) >= num_layers:
                    continue
                state[key] = f.get_tensor(key)
    return state


def write_state(directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int | None = None) -> None:
    """state -> model.safetensors, or (over max_shard_bytes) model-0000i-of-0000n.safetensors + the index.

    Tensors are packed in name order; a tensor larger than the limit gets a shard of its own."""
    directory = Path(directory)
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    total = sum(sizes.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(directory / SINGLE), metadata={"format": "pt"})
        return
    shards, current, used = [], [], 0
    for key in sorted(state):
        if current and used + sizes[key] > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += sizes[key]
    shards.append(current)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
