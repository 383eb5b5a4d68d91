"""FSDP2 for the learner: shard the policy and the reference over the learner ranks, checkpoint activations
per decoder layer, and gather full tensors one at a time for export and weight sync.

Applied from outside the model after construction (STYLE 5): `shard_model` calls
`torch.distributed.fsdp.fully_shard` on every decoder layer, then on the root (embeddings, final norm,
lm_head, tied or not). Parameters become DTensors sharded on dim 0; FSDP all-gathers a layer for its
forward and backward and reduce-scatters its gradient, so each rank holds 1/N of the parameters, the
gradients and (the optimizer being built on the sharded parameters) the AdamW moments.

Choices:
- Gradients are *summed* over ranks (divide factor 1): every rank's loss already carries the global
  normaliser of the mini-batch (grpo_learner.py), so the sum is exactly the one-rank gradient. Parameters
  a rank did not use (MoE experts its tokens never chose) reduce zeros, so every rank's collectives match.
- Mixed precision is autocast (bf16 matmuls) around the forward, not MixedPrecisionPolicy, so one code
  path serves one rank (no FSDP) and N ranks; parameters, gradients, reductions and AdamW stay fp32.
- Activation checkpointing wraps each layer's own forward (no wrapper module: parameter names, hence
  checkpoints, are unchanged). A layer writes its KV into the PrefixKV it is given; the recomputation
  in backward first puts back the cache entry the first pass saw, so it writes the same KV again
  instead of appending a second copy.
- The reference model is sharded like the policy, or additionally kept in CPU memory between uses
  (`reference: cpu_offload`, FSDP's CPUOffloadPolicy: each layer is copied to the device for its
  forward). It is never a full copy per rank.
"""
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from dsarl.models.kv_cache import PrefixKV, SharedPrefixKV


@dataclass
class FSDPConfig:
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (memory for compute)
    mixed_precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast matmuls; fp32 master weights and AdamW
    reference: Literal["sharded", "cpu_offload"] = "sharded"  # the frozen reference: sharded like the policy,
    # or sharded and kept in CPU memory between uses (one rank: one copy, in CPU memory with cpu_offload)


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of a FSDPConfig.mixed_precision value (None: plain fp32)."""
    table = {"fp32": None, "bf16": torch.bfloat16}
    if mixed_precision not in table:
        raise ValueError(f"learner.fsdp.mixed_precision must be one of {sorted(table)}, got {mixed_precision!r}")
    return table[mixed_precision]


def shard_model(model, offload: bool = False, mesh=None):
    """fully_shard every decoder layer, then the root; gradients summed over ranks. -> the model (its
    class is now also an FSDPModule). Needs the default process group (or `mesh`)."""
    kw = {"mesh": mesh} if mesh is not None else {}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: the losses carry the global normaliser
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
            # MoE: an expert no token of this rank chose has no gradient here but may on another rank;
            # zeros keep every rank's reduce-scatter the same size (else the ranks wait on each other)
            module.set_reduce_scatter_unused_params(True, recurse=False)
    return model


def apply_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    for layer in model.model.layers:
        layer.forward = _checkpointed(layer.forward, layer.layer_idx)


def _checkpointed(forward, layer_idx: int):
    def run(x, cos, sin, positions, cache, *args):
        if not torch.is_grad_enabled() or not (cache is None or isinstance(cache, (PrefixKV, SharedPrefixKV))):
            return forward(x, cos, sin, positions, cache, *args)  # nothing to save memory on (no backward)
        past = None if cache is None else cache.layers[layer_idx]

        def body(x, *rest):
            if cache is not None:
                cache.layers[layer_idx] = past  # the recomputation sees the cache as the first pass did
            return forward(x, cos, sin, positions, cache, *rest)

        return checkpoint(body, x, *args, use_reentrant=False)

    return run


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def full_state_items(model, rank: int, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full CPU tensor) of the model's state dict, one tensor at a time. Sharded tensors are
    all-gathered, so every rank must run this generator to the end, in step; only rank 0 yields (the
    others yield nothing), and each full tensor is dropped once the consumer moves on: no rank ever holds
    a second full copy of the model. copy=False: an unsharded CPU model's own tensors, for a consumer that
    copies them before the weights change (packing a sync)."""
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            full = value.full_tensor().detach()  # collective: every rank
            if rank == 0:
                yield name, full.cpu()
        elif rank == 0:
            yield name, value.detach().to("cpu", copy=copy)  # a copy: the caller may keep it past the next step


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_sizes(model, optimizer, measure) -> dict[str, int]:
    params = list(model.parameters())  # tied weights once
    out = {"params": sum(measure(_local(p)) for p in params),
           "grads": sum(measure(_local(p.grad)) for p in params if p.grad is not None), "optimizer": 0}
    for state in (optimizer.state.values() if optimizer is not None else ()):
        out["optimizer"] += sum(measure(_local(v)) for v in state.values()
                                if torch.is_tensor(v) and v.dim() > 0)  # the moments, not the scalar step
    return out


def local_state_numel(model, optimizer=None) -> dict[str, int]:
    """Elements this rank holds: its parameter shards, their gradients, and its optimizer state shards."""
    return _local_sizes(model, optimizer, lambda t: t.numel())


def local_state_bytes(model, optimizer=None) -> dict[str, int]:
    """Bytes of what local_state_numel counts."""
    return _local_sizes(model, optimizer, lambda t: t.numel() * t.element_size())
