"""One learner or several: N `LearnerActor` ranks forming one torch.distributed group.

The driver talks to the group as to one learner. Every rank gets the whole rollout batch (it is
small next to the model) and trains on its part of it; with N > 1 ranks the model, its gradients and
the AdamW state are sharded with FSDP2 (gloo on CPU, NCCL on GPU; learner/fsdp.py). Gathering full
weights (publishing, checkpoints, the final export) is a collective, so the group calls every rank
and takes rank 0's answer.
"""
import ray
import torch

from .learner_actor import LearnerActor


class LearnerGroup:
    def __init__(self, num_ranks: int, init_checkpoint: str, cfg, seed: int = 0, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, num_threads: int = 0, resume_from: str | None = None,
                 model_overrides: dict | None = None, placement=None, total_updates: int | None = None):
        if num_ranks < 1:
            raise ValueError(f"learner ranks must be >= 1, got {num_ranks}")
        options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self.ranks = []
        for r in range(num_ranks):
            opts = dict(options, **(placement(r) if placement else {}))
            self.ranks.append(LearnerActor.options(**opts).remote(init_checkpoint, cfg, seed, num_threads,
                                                                  resume_from, model_overrides, total_updates,
                                                                  num_ranks))
        if num_ranks > 1:
            addr, port = ray.get(self.ranks[0].address.remote())
            backend = "nccl" if num_gpus > 0 and torch.cuda.is_available() else "gloo"
            ray.get([a.init_distributed.remote(addr, port, r, num_ranks, backend) for r, a in enumerate(self.ranks)])
        else:
            ray.get(self.ranks[0].weight_version.remote())  # surface construction errors here

    def _all(self, method: str, *args) -> list:
        """Calls a method on every rank (a collective needs them all) -> their answers, rank order."""
        return ray.get([getattr(a, method).remote(*args) for a in self.ranks])

    def update(self, groups) -> dict:
        return self._all("update", groups)[0]

    def publish_weights(self):
        ref, version = self._all("publish_weights")[0]
        return ref, version

    def state_dict(self) -> dict:
        return self._all("state_dict")[0]

    def local_state_dicts(self) -> list[dict]:
        """Each rank's own shards of the policy."""
        return self._all("local_state_dict")

    def memory(self) -> list[dict]:
        """Per rank: local parameter / gradient / optimizer elements and bytes, peak RSS."""
        return self._all("memory")

    def pids(self) -> list[int]:
        return self._all("pid")

    def weight_version(self) -> int:
        return ray.get(self.ranks[0].weight_version.remote())

    def save(self, run_dir: str, step: int, driver_state: dict, keep: int = 2) -> str:
        return self._all("save", run_dir, step, driver_state, keep)[0]

    def save_final(self, directory: str) -> str:
        return self._all("save_final", directory)[0]

    def shutdown(self) -> None:
        for a in self.ranks:
            ray.kill(a)

    def weight_broadcast_address(self) -> tuple[str, int]:
        """Where rank 0 hosts the weight broadcast's rendezvous (a socket it has bound)."""
        return ray.get(self.ranks[0].weight_broadcast_address.remote())

    def join_weight_broadcast(self, master_addr: str, master_port: int, world_size: int, backend: str,
                              timeout_s: float = 600.0) -> ray.ObjectRef:
        """Rank 0 joins the weight broadcast group as its rank 0; a ref to its weight spec (the workers
        join at the same time: wait for theirs after this one)."""
        return self.ranks[0].join_weight_broadcast.remote(master_addr, master_port, world_size, backend, timeout_s)

    def send_weights_broadcast(self, version: int, bucket_bytes: int) -> list[ray.ObjectRef]:
        """Every rank's send call (rank 0 sends; the others take part in gathering the weights); refs."""
        return [a.send_weights_broadcast.remote(version, bucket_bytes) for a in self.ranks]
