"""A state dict as one flat byte buffer plus its layout: what the object-store weight sync puts.

Ray writes a numpy array into its object store with one copy and gives every reader on the node a
zero-copy view of that shared memory; a dict of torch tensors is pickled tensor by tensor instead, copied
on the way in and again on every reader's way out. For the 3.4 M-parameter bench model (71 tensors,
14 MB) a put took 24-34 ms and each worker's get 8 ms that way, against ~13 ms and 0.5 ms packed.

Tensors of any dtype go in as their bytes (numpy has no bfloat16), each at a 64-byte aligned offset.
`unpack()` returns views into the buffer: a reader copies them into its own weights and keeps the
PackedState alive while it does (a staged partial-rollout sync holds it until the swap).
"""
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 64


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes into the buffer

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass
class PackedState:
    slots: list[Slot]
    data: np.ndarray  # uint8, every slot's bytes

    def unpack(self) -> dict[str, torch.Tensor]:
        """name -> a view of the buffer (read-only when it is Ray's shared memory: only copy from it)."""
        with warnings.catch_warnings():  # torch warns that writing to a read-only buffer's view is undefined
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(self.data)
        return {s.name: flat[s.offset: s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.slots}


def layout(specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[list[Slot], int]:
    """(name, shape, dtype) in order -> the slots and the buffer's size in bytes."""
    slots, end = [], 0
    for name, shape, dtype in specs:
        slot = Slot(name, tuple(shape), dtype, -(-end // ALIGN) * ALIGN)
        slots.append(slot)
        end = slot.offset + slot.nbytes
    return slots, end


def pack_into(slots: list[Slot], items: Iterable[tuple[str, torch.Tensor]], data: np.ndarray) -> PackedState:
    """Copies the tensors of `items` (the slots' names, in order; any device) into `data` (a reused
    buffer of at least the layout's size: no fresh pages to fault in on every sync)."""
    flat = torch.from_numpy(data)
    for slot, (name, tensor) in zip(slots, items, strict=True):
        if name != slot.name or tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(f"packing {name} {tuple(tensor.shape)} {tensor.dtype} into the slot of {slot}")
        flat[slot.offset: slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape).copy_(tensor.detach())
    return PackedState(slots, data)


def pack_state(state_dict: dict[str, torch.Tensor]) -> PackedState:
    """A state dict -> a PackedState in a new buffer."""
    slots, size = layout((k, tuple(v.shape), v.dtype) for k, v in state_dict.items())
    return pack_into(slots, state_dict.items(), np.empty(size, dtype=np.uint8))
