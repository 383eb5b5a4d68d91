"""The learner as a Ray actor: a thin shell that owns a device, the policy, the reference and the
optimizer, and calls the plain GRPOLearner (learner/grpo_learner.py) to do the work.

With N > 1 ranks the policy and the reference are sharded with FSDP2 (learner/fsdp.py) once the
ranks' torch.distributed group exists (`init_distributed`); the optimizer is built on the shards and
a resume loads them there. Every method that gathers (update, publish_weights, state_dict, save,
save_final, full_state_items) is a collective: the group calls it on every rank, and only rank 0's
answer carries the weights.
"""
import copy
import resource
from pathlib import Path

import numpy as np
import ray
import torch

from dsarl.learner.checkpointing import (export_pretrained, has_sharded_state, latest_checkpoint, load_model_weights,
                                         load_sharded_state, load_training_state, save_sharded_checkpoint)
from dsarl.learner.fsdp import apply_activation_checkpointing, local_state_bytes, local_state_numel, shard_model
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig
from dsarl.models import from_pretrained

from .allocator import keep_freed_memory
from .packed_state import layout, pack_into
from .weight_sync import weight_spec
from .threads import follow_cpu_share


class Learner:
    """Plain object (testable without Ray); `LearnerActor` is its Ray actor. world_size > 1: the learner is
    built by init_distributed, after the group forms."""

    def __init__(self, init_checkpoint: str, cfg: LearnerConfig, seed: int = 0, num_threads: int = 0,
                 resume_from: str | None = None, model_overrides: dict | None = None,
                 total_updates: int | None = None, world_size: int = 1):
        follow_cpu_share(num_threads)  # torch/OpenMP threads = this rank's CPU share (or num_threads)
        keep_freed_memory()  # a long-context step's big activations reuse the heap, not fresh pages
        torch.manual_seed(seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg, self.total_updates, self.resume_from = cfg, total_updates, resume_from
        self.init_checkpoint, self.model_overrides = init_checkpoint, model_overrides or {}
        self.rank, self.world_size = 0, world_size
        self._pack_spec, self._pack_offsets, self._pack_buffer = None, None, None  # publish_weights', reused
        self.policy, self.tokenizer = from_pretrained(init_checkpoint, device=self.device, **self.model_overrides)
        self.learner: GRPOLearner | None = None
        self.state: dict = {"step": 0}
        if world_size == 1:
            self._build()

    def _build(self) -> None:
        """Reference, sharding, optimizer (on the shards), then the resume: in that order."""
        cfg, policy = self.cfg, self.policy
        for p in policy.indexer_parameters():
            p.requires_grad_(cfg.train_indexer)  # before sharding: FSDP groups parameters by requires_grad
        reference = self._reference() if cfg.loss.beta > 0 else None
        if cfg.fsdp.activation_checkpointing:
            apply_activation_checkpointing(policy)  # after the reference's deepcopy: the policy's layers only
        if self.world_size > 1:
            shard_model(policy)
        self.learner = GRPOLearner(policy, reference, cfg, self.total_updates)
        self.learner.set_data_parallel(self.rank, self.world_size)
        if self.resume_from is not None:
            self._resume(self.resume_from)

    def _reference(self):
        """The frozen reference: the initial weights. N ranks: loaded again and sharded, so no rank keeps a
        full copy. One rank: a copy, or with cpu_offload FSDP's CPU offload on a group of this process alone
        (the copy lives in CPU memory, each layer visits the device for its forward)."""
        offload = self.cfg.fsdp.reference == "cpu_offload"
        if self.world_size == 1 and not offload:
            return copy.deepcopy(self.policy)
        if self.world_size == 1:
            import torch.distributed as dist

            if not dist.is_initialized():  # FSDP needs a group; this one spans this process alone
                dist.init_process_group("nccl" if self.device == "cuda" else "gloo", store=dist.HashStore(),
                                        rank=0, world_size=1)
        reference, _ = from_pretrained(self.init_checkpoint, device=self.device, **self.model_overrides)
        return shard_model(reference, offload=offload)

    def _resume(self, path: str) -> None:
        if has_sharded_state(path):
            load_sharded_state(path, self.policy, self.learner.optimizer)
            self.state = load_training_state(path)
        elif self.world_size == 1:  # a checkpoint of one process's optimizer (optimizer.pt)
            load_model_weights(self.policy, path)
            self.state = load_training_state(path, self.learner.optimizer)
        else:
            raise ValueError(f"{path} holds no sharded state (dcp/): it was written before sharded checkpoints; "
                             f"resume it with learner_ranks: 1 (its next checkpoint resumes on any number)")
        self.learner.version = int(self.state.get("weight_version", self.state["step"]))
        self.learner.optimizer_steps = int(self.state.get("optimizer_steps", 0))  # the LR schedule's position

    def init_distributed(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str) -> int:
        """Join the learners' torch.distributed group (gloo on CPU, NCCL on GPU), then shard and build.
        Rank 0 serves the rendezvous from the socket `address` bound (actors/rendezvous.py)."""
        import torch.distributed as dist

        from dsarl.actors.rendezvous import join_store

        store = join_store(getattr(self, "_store_host", None) if rank == 0 else None, (master_addr, master_port),
                           world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size
        self._build()
        return rank

    def address(self) -> tuple[str, int]:
        """Where rank 0 serves the rendezvous: a socket bound to this node's Ray address only."""
        from dsarl.actors.rendezvous import StoreHost

        self._store_host = StoreHost()
        return self._store_host.address

    def update(self, groups) -> dict:
        return self.learner.update(groups)

    def weight_version(self) -> int:
        return self.learner.version

    def pid(self) -> int:
        """This rank's process id (fault-injection tests and tools)."""
        import os

        return os.getpid()

    def memory(self) -> dict:
        """What this rank holds: local parameter, gradient and optimizer elements and bytes (its shards),
        and the process's peak resident memory."""
        numel = local_state_numel(self.policy, self.learner.optimizer)
        size = local_state_bytes(self.policy, self.learner.optimizer)
        out = {**{f"{k}_numel": v for k, v in numel.items()}, **{f"{k}_bytes": v for k, v in size.items()},
               "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
        if torch.cuda.is_available():
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return out

    def full_state_items(self):
        """(name, full CPU tensor) one at a time; a collective every rank must exhaust; only rank 0 yields."""
        return self.learner.full_state_items()

    def publish_weights(self) -> list:
        """One ray.put of the new weights, packed in one buffer (actors/packed_state.py); returns [ref]
        (wrapped, so the caller gets the reference and every rollout worker fetches the same object) and
        the version. Collective: rank 0's ref, None elsewhere."""
        items = self.learner.full_state_items(copy=False)
        if self.rank != 0:
            for _ in items:  # the gathers are collectives: run them in step with rank 0
                pass
            return [None, self.learner.version]
        if self._pack_buffer is None:
            self._pack_spec = weight_spec(self.policy.state_dict())
            self._pack_offsets, size = layout(self._pack_spec)
            self._pack_buffer = np.empty(size, dtype=np.uint8)
        return [ray.put(pack_into(self._pack_spec, self._pack_offsets, items, self._pack_buffer)),
                self.learner.version]

    def state_dict(self) -> dict:
        """The full policy on rank 0 ({} elsewhere); collective."""
        return dict(self.full_state_items())

    def local_state_dict(self) -> dict:
        """This rank's own shards of the policy (tests: ranks hold different parts)."""
        from torch.distributed.tensor import DTensor

        return {k: (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().clone()
                for k, v in self.policy.state_dict().items()}

    def save(self, run_dir: str, step: int, driver_state: dict, keep: int = 2) -> str:
        """A resumable checkpoint (collective): dcp/ shards from every rank, the HF model gathered on rank 0."""
        state = {**driver_state, "weight_version": self.learner.version,
                 "optimizer_steps": self.learner.optimizer_steps}
        return str(save_sharded_checkpoint(run_dir, step, self.policy, self.learner.optimizer, self.full_state_items(),
                                           self.policy.config, self.tokenizer, state, self.rank, keep=keep))

    def save_final(self, directory: str) -> str | None:
        """What models.save_pretrained writes for the policy, gathered on rank 0 (collective)."""
        path = export_pretrained(Path(directory), self.policy.config, self.full_state_items(), self.tokenizer,
                                 self.rank)
        return None if path is None else str(path)

    def weight_spec(self) -> list:
        """What a weight broadcast carries: names, full shapes and dtypes, in full_state_items' order (read
        from the state dict's metadata, so nothing is gathered); a tied lm_head is left out, workers re-tie it."""
        tied = ("lm_head.weight",) if self.policy.config.tie_word_embeddings else ()
        return weight_spec(self.policy.state_dict(), skip=tied)

    def weight_broadcast_address(self) -> tuple[str, int]:
        """Where this rank serves the weight broadcast's rendezvous: a socket bound to this node's Ray address
        only (actors/rendezvous.py), apart from the learners' own group's."""
        from dsarl.actors.rendezvous import StoreHost

        self._broadcast_host = StoreHost()
        return self._broadcast_host.address

    def join_weight_broadcast(self, master_addr: str, master_port: int, world_size: int, backend: str,
                              timeout_s: float = 600.0) -> list:
        """Become rank 0 of the weight broadcast group with the rollout workers (actors/weight_sync.py);
        returns the weight spec every sync follows."""
        from .weight_sync import GroupHolder

        if not hasattr(self, "weight_broadcast"):
            self.weight_broadcast = GroupHolder()
        host, self._broadcast_host = getattr(self, "_broadcast_host", None), None  # bound by weight_broadcast_address
        self.weight_broadcast.join(master_addr, master_port, 0, world_size, backend, timeout_s, host)
        return self.weight_spec()

    def send_weights_broadcast(self, version: int, bucket_bytes: int) -> int:
        """Sends the weights of `version` to the rollout workers, one bucket at a time from
        full_state_items. A rank outside the broadcast group (learner ranks > 0) walks the stream too,
        since gathering sharded weights is a collective of all learner ranks."""
        from .weight_sync import BroadcastGroup

        holder = getattr(self, "weight_broadcast", None)
        if holder is None:
            for _ in self.full_state_items():
                pass
            return version
        # a driver asking for another version than this learner's makes every rank refuse, not hang
        holder.run(f"weight broadcast of version {version}", BroadcastGroup.send, self.full_state_items(),
                   self.weight_spec(), self.learner.version, bucket_bytes, version == self.learner.version)
        return version

LearnerActor = ray.remote(Learner)


def resume_checkpoint(run_dir: str) -> str | None:
    ckpt = latest_checkpoint(run_dir)
    return str(ckpt) if ckpt is not None else None
