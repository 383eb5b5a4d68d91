"""Chooses an implementation for each op: Triton on CUDA, the torch reference elsewhere.

`DSARL_KERNELS=reference|triton` forces one (triton on a CPU tensor only makes sense with
TRITON_INTERPRET=1, which is how the kernel tests run on machines without a GPU).
"""
import os

import torch

BACKENDS = ("reference", "triton")


def forced_backend() -> str | None:
    choice = os.environ.get("DSARL_KERNELS", "").strip().lower()
    if choice and choice not in BACKENDS:
        raise ValueError(f"DSARL_KERNELS={choice!r}: expected one of {BACKENDS}")
    return choice or None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    forced = forced_backend()
    if forced is not None:
        return forced == "triton"
    return x.is_cuda and triton_available()
