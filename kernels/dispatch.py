"""Every op's backends in one table, chosen by one rule.

    TABLES[op] = {backend: Impl}, backend in BACKENDS = ("reference", "cpu", "triton")

- `reference`: plain torch on any device, the definition of correctness (every op has one).
- `cpu`: the op's one fast CPU implementation: a C kernel (`kernels/<op>/cpu.c`, built on first use by
  native.py) or, for indexer_scores, cache-tiled torch matmuls.
- `triton`: the Triton kernel, for CUDA tensors.

The rule (`choose(op, x)`, x the op's leading tensor):
1. fp64 inputs take the reference: every fast path computes in fp32, and fp64 is for gradcheck.
2. `DSARL_KERNELS=reference|cpu|triton` forces that backend for every op that has one; an op without
   it (dense_mla has no Triton kernel, top-k none either) runs its reference. A forced backend that
   cannot run here is an error naming DSARL_KERNELS: `cpu` without a C compiler, `triton` without
   triton, or on CPU tensors unless TRITON_INTERPRET=1 (how the kernel tests run Triton on a CPU).
   Silently running something else would make a forced comparison compare nothing.
3. Otherwise: Triton on CUDA tensors when triton imports, the CPU backend on CPU tensors when it loads
   (C compiler present, DSARL_NATIVE not 0), else the reference.

Implementations are named by "module:function" under dsarl.kernels and imported on first choice, so
importing dsarl.kernels never imports triton (the interpreter is fixed when a kernel is decorated).
`record()` lists the (op, backend) choices made inside it (bench output, tests).
"""
import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import native

BACKENDS = ("reference", "cpu", "triton")
ENV = "DSARL_KERNELS"


@dataclass(frozen=True)
class Impl:
    target: str  # "module:function" relative to dsarl.kernels
    c_source: str | None = None  # the C file it runs (relative to kernels/), which must build and load


TABLES: dict[str, dict[str, Impl]] = {
    "indexer_scores": {"reference": Impl("indexer_scores.reference:indexer_scores_reference"),
                       "cpu": Impl("indexer_scores.matmul:indexer_scores_matmul"),
                       "triton": Impl("indexer_scores.triton:indexer_scores_triton")},
    "indexer_scores_selected": {"reference": Impl("indexer_scores.selected:indexer_scores_selected")},
    "topk": {"reference": Impl("topk.reference:topk_indices_reference"),
             "cpu": Impl("topk.cpu:topk_indices_cpu", "topk/cpu.c")},
    # the reference is the definition (scores, then top-k, per chunk of queries) through the two public
    # ops, so on CUDA it runs Triton scores; the C kernel fuses both per query row instead
    "indexer_topk": {"reference": Impl("topk.chunked:indexer_topk_chunked"),
                     "cpu": Impl("topk.cpu:indexer_topk_cpu", "topk/cpu.c")},
    "sparse_mla": {"reference": Impl("sparse_mla.reference:sparse_mla_attention_reference"),
                   "cpu": Impl("sparse_mla.cpu:sparse_mla_attention_cpu", "sparse_mla/cpu.c"),
                   "triton": Impl("sparse_mla.triton:sparse_mla_attention_triton")},
    # the CPU backend is the sparse MLA C kernel with every visible key selected
    "dense_mla": {"reference": Impl("dense_mla.reference:dense_mla_attention_reference"),
                  "cpu": Impl("dense_mla.cpu:dense_mla_attention_cpu", "sparse_mla/cpu.c")},
    "dense_mha": {"reference": Impl("dense_mla.mha:dense_mha_attention")},
    "rms_norm": {"reference": Impl("rowwise.reference:rms_norm_reference"),
                 "cpu": Impl("rowwise.cpu:rms_norm_cpu", "rowwise/cpu.c")},
    "swiglu": {"reference": Impl("rowwise.reference:swiglu_reference"),
               "cpu": Impl("rowwise.cpu:swiglu_cpu", "rowwise/cpu.c")},
    "indexer_kl": {"reference": Impl("indexer_kl.reference:indexer_kl_loss_reference"),
                   "triton": Impl("indexer_kl.triton:indexer_kl_loss_triton")},
    # the replay codec's rows, coded and decoded (data/index_codec.py: the record around them)
    "index_encode": {"reference": Impl("index_codec.reference:encode_rows_reference"),
                     "cpu": Impl("index_codec.cpu:encode_rows_cpu", "index_codec/cpu.c")},
    "index_decode": {"reference": Impl("index_codec.reference:decode_rows_reference"),
                     "cpu": Impl("index_codec.cpu:decode_rows_cpu", "index_codec/cpu.c")},
}

_recorded: contextvars.ContextVar[list | None] = contextvars.ContextVar("dsarl_kernel_choices", default=None)


def forced_backend() -> str | None:
    """The backend DSARL_KERNELS forces, or None (unset or empty); an unknown value is an error."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice and choice not in BACKENDS:
        raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(BACKENDS)} (or unset)")
    return choice or None


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def unusable(op: str, backend: str, x: torch.Tensor, forced: bool = False) -> str | None:
    """Why `backend` of `op` cannot run on x here, or None when it can."""
    impl = TABLES[op].get(backend)
    if impl is None:
        return f"{op} has no {backend} implementation"
    if backend == "triton":
        # the tensor first: a CPU-only process never imports triton (~0.1 s and ~70 MB in every actor)
        if not x.is_cuda and not (forced and os.environ.get("TRITON_INTERPRET") == "1"):
            return "Triton kernels take CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
        if not triton_available():
            return "triton is not installed"
    if backend == "cpu":
        if x.device.type != "cpu":
            return f"the CPU implementation takes CPU tensors, got {x.device}"
        if impl.c_source is not None and not native.available(native.source(impl.c_source)):
            return f"its C kernel is unavailable: {native.unavailable_reason(native.source(impl.c_source))}"
    return None


def choose_backend(op: str, x: torch.Tensor) -> str:
    """The backend `op` runs on x: the rule of the module docstring."""
    table = TABLES[op]
    if x.dtype == torch.float64:
        return "reference"
    forced = forced_backend()
    if forced is not None:
        if forced not in table:
            return "reference"
        reason = unusable(op, forced, x, forced=True)
        if reason is not None:
            raise RuntimeError(f"{ENV}={forced} for {op}: {reason}")
        return forced
    for backend in ("triton", "cpu"):
        if backend in table and unusable(op, backend, x) is None:
            return backend
    return "reference"


@functools.cache
def implementation(op: str, backend: str) -> Callable:
    """The function TABLES[op][backend] names, imported on first use."""
    module, name = TABLES[op][backend].target.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def choose(op: str, x: torch.Tensor) -> Callable:
    """The implementation of `op` for x (see choose_backend)."""
    backend = choose_backend(op, x)
    log = _recorded.get()
    if log is not None:
        log.append((op, backend))
    return implementation(op, backend)


@contextlib.contextmanager
def forcing(backend: str):
    """DSARL_KERNELS=backend inside, the previous value (or none) restored after (benches timing backends)."""
    old = os.environ.get(ENV)
    os.environ[ENV] = backend
    try:
        yield
    finally:
        if old is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = old


@contextlib.contextmanager
def record():
    """with record() as chosen: ... -> chosen lists each (op, backend) chosen inside, in call order."""
    chosen: list[tuple[str, str]] = []
    token = _recorded.set(chosen)
    try:
        yield chosen
    finally:
        _recorded.reset(token)
