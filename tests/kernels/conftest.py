"""Kernel tests: Triton kernels run under TRITON_INTERPRET=1 on machines without a GPU.

The interpreter is chosen when a kernel is decorated, i.e. when its module is first imported, so
the variable is set here, before any test module imports a `.triton` file. Interpreter runs are
fp32 (it mishandles bf16 tl.dot); bf16/fp8 checks are CUDA-only tests.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (STYLE rule 16: no hidden global RNG state)."""
    return torch.Generator(device="cpu").manual_seed(1234)
