"""Weight sync from the learner to rollout workers (DESIGN.md section 4), every sync with a version.

- Object store (default): the learner's state dict is `ray.put` once; every worker reads the same
  object and copies it into its engine (RolloutPool.sync_weights).
- Broadcast: a torch.distributed group of the learner (rank 0) and the workers (ranks 1..N), NCCL
  on GPU and gloo on CPU. The group is a standalone ProcessGroup on its own TCPStore, never the
  default group, so a learner that already runs FSDP in its own default group can still join it.
  Tensors go in dtype-homogeneous flat buckets (one collective per bucket, not per tensor), in the
  order of a `weight_spec` both sides agree on; receivers check it against their own model.
"""
import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = {"gloo": dist.ProcessGroupGloo}
if hasattr(dist, "ProcessGroupNCCL"):
    BACKENDS["nccl"] = dist.ProcessGroupNCCL

DTYPE_NAMES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int32, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # str(torch.dtype)


def weight_spec(state_dict: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> list[TensorSpec]:
    """The tensors a sync carries, sorted by name (tied weights named in `skip` are left out)."""
    return [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(state_dict.items()) if k not in skip]


def buckets(spec: list[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive same-dtype runs of the spec, each at most bucket_bytes (a bigger tensor goes alone)."""
    out, cur, size = [], [], 0
    for s in spec:
        nbytes = torch.Size(s.shape).numel() * DTYPE_NAMES[s.dtype].itemsize
        if cur and (s.dtype != cur[0].dtype or size + nbytes > bucket_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += nbytes
    return out + ([cur] if cur else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class BroadcastGroup:
    """One process's membership of a learner -> workers broadcast group."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 600.0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout,
                                   wait_for_workers=False)
        self.pg = BACKENDS[backend](self.store, rank, world_size, timeout)  # blocks until every rank joined
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def send(self, state_dict: dict[str, torch.Tensor], spec: list[TensorSpec], bucket_bytes: int = 64 << 20):
        assert self.rank == 0, f"only the learner (rank 0) sends, this is rank {self.rank}"
        for bucket in buckets(spec, bucket_bytes):
            flat = torch.cat([state_dict[s.name].detach().reshape(-1) for s in bucket]).to(self.device)
            self.pg.broadcast([flat], _root0()).wait()

    def receive(self, spec: list[TensorSpec], bucket_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
        out = {}
        for bucket in buckets(spec, bucket_bytes):
            sizes = [torch.Size(s.shape).numel() for s in bucket]
            flat = torch.empty(sum(sizes), dtype=DTYPE_NAMES[bucket[0].dtype], device=self.device)
            self.pg.broadcast([flat], _root0()).wait()
            for s, part in zip(bucket, flat.split(sizes)):
                out[s.name] = part.view(s.shape)
        return out


def _root0():
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


def connect_pool(pool, backend: str = "gloo", master_addr: str | None = None) -> BroadcastGroup:
    """Forms the group with this process as the learner (rank 0) and the pool's workers as 1..N."""
    import ray

    addr = master_addr or ray.util.get_node_ip_address()
    port = free_port()
    refs = pool.join_broadcast(addr, port, backend)  # workers block in the rendezvous...
    group = BroadcastGroup(addr, port, 0, pool.num_workers + 1, backend)  # ...until rank 0 arrives
    ray.get(refs)
    return group


def broadcast_weights(pool, group: BroadcastGroup, state_dict: dict[str, torch.Tensor], version: int,
                      skip: tuple[str, ...] = ("lm_head.weight",), bucket_bytes: int = 64 << 20) -> None:
    """Learner side of a broadcast sync: workers start receiving, rank 0 sends, all load `version`.
    `skip`: tied weights the receivers rebuild themselves (lm_head tied to the embeddings)."""
    import ray

    spec = weight_spec({k: v for k, v in state_dict.items()}, skip=skip)
    refs = pool.receive_broadcast(spec, version, bucket_bytes)
    group.send(state_dict, spec, bucket_bytes)
    ray.get(refs)
