"""The learner as a Ray actor: a thin shell that owns a device, the policy, the reference and the
optimizer, and calls the plain GRPOLearner (learner/grpo_learner.py) to do the work."""
import copy
from pathlib import Path

import ray
import torch

from dsarl.learner.checkpointing import (latest_checkpoint, load_model_weights, load_training_state,
                                         save_training_checkpoint)
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig
from dsarl.models import from_pretrained

from .threads import follow_cpu_share


class Learner:
    """Plain object (testable without Ray); `LearnerActor` is its Ray actor."""

    def __init__(self, init_checkpoint: str, cfg: LearnerConfig, seed: int = 0, num_threads: int = 0,
                 resume_from: str | None = None, model_overrides: dict | None = None,
                 total_updates: int | None = None):
        follow_cpu_share(num_threads)  # torch/OpenMP threads = this rank's CPU share (or num_threads)
        torch.manual_seed(seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.policy, self.tokenizer = from_pretrained(init_checkpoint, device=device, **(model_overrides or {}))
        reference = copy.deepcopy(self.policy) if cfg.loss.beta > 0 else None
        self.learner = GRPOLearner(self.policy, reference, cfg, total_updates)
        self.state: dict = {"step": 0}
        if resume_from is not None:
            load_model_weights(self.policy, resume_from)
            self.state = load_training_state(resume_from, self.learner.optimizer)
            self.learner.version = int(self.state.get("weight_version", self.state["step"]))
            self.learner.optimizer_steps = int(self.state.get("optimizer_steps", 0))  # the LR schedule's position

    def init_distributed(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str) -> int:
        """Join the learners' torch.distributed group (gloo on CPU, NCCL on GPU) for data parallelism.
        Rank 0 serves the rendezvous from the socket `address` bound (actors/rendezvous.py)."""
        import torch.distributed as dist

        from dsarl.actors.rendezvous import join_store

        store = join_store(getattr(self, "_store_host", None) if rank == 0 else None, (master_addr, master_port),
                           world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        self.learner.set_data_parallel(rank, world_size)
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

    def publish_weights(self) -> list:
        """One ray.put of the new weights; returns [ref] (wrapped, so the caller gets the reference and
        every rollout worker fetches the same object) and the version."""
        state = {k: v.cpu() for k, v in self.learner.state_dict().items()}
        return [ray.put(state), self.learner.version]

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.learner.state_dict().items()}

    def save(self, run_dir: str, step: int, driver_state: dict, keep: int = 2) -> str:
        state = {**driver_state, "weight_version": self.learner.version,
                 "optimizer_steps": self.learner.optimizer_steps}
        return str(save_training_checkpoint(run_dir, step, self.policy, self.tokenizer, self.learner.optimizer, state,
                                            keep=keep))

    def save_final(self, directory: str) -> str:
        from dsarl.models import save_pretrained

        return str(save_pretrained(self.policy, Path(directory), self.tokenizer))

    def full_state_items(self):
        """(name, full CPU tensor) pairs of the policy's weights, one at a time."""
        yield from self.learner.state_dict().items()

    def weight_spec(self) -> list:
        """What a weight broadcast carries: names, full shapes and dtypes, in full_state_items' order (read
        from the state dict's metadata, so nothing is gathered); a tied lm_head is left out, workers re-tie it."""
        from .weight_sync import weight_spec

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
