"""Weight sync from the learner to rollout workers (DESIGN.md section 4), every sync with a version.
`sync.method` in the GRPO config picks one of the two (SYNC_METHODS at the end of this file).

- Object store (default): learner rank 0 `ray.put`s its state dict once, packed in one byte buffer
  (packed_state.py: one copy in, a zero-copy view out); every worker reads the same object and copies it
  into its engine (RolloutPool.sync_weights).
- Broadcast: a torch.distributed group of learner rank 0 (rank 0) and the workers (ranks 1..N), NCCL
  on GPU and gloo on CPU. The group is a standalone ProcessGroup on its own TCPStore, never the
  default group, so a learner that already runs FSDP in its own default group can still join it.
  Tensors go in dtype-homogeneous flat buckets (one collective per bucket, not per tensor), in the
  order of a `weight_spec` both sides agree on. The sender fills each bucket from a stream of
  (name, full tensor) pairs, so it never holds more than one bucket beyond the stream's own tensor.

Every broadcast sync starts with a header (the sender's weight version and a digest of the spec) and a
vote: a worker told to expect another version or spec refuses, and then every rank raises together
instead of leaving the others blocked in a collective. A rank whose collective fails (a peer died)
drops its group, which closes its sockets, so the ranks still waiting fail at once rather than at
their timeout; the driver then re-forms the group (BroadcastSync.restore).
"""
import datetime
import gc
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .rendezvous import StoreHost

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

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * DTYPE_NAMES[self.dtype].itemsize


class SyncRefused(RuntimeError):
    """Some rank refused a broadcast sync (version or spec mismatch); every rank raises it together."""


class SenderLost(RuntimeError):
    """The learner process died during a broadcast sync (its cause is Ray's error)."""


def weight_spec(state_dict: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> list[TensorSpec]:
    """The tensors a sync carries, in the state dict's order (tied weights named in `skip` are left out).
    Only shapes and dtypes are read: a sharded (DTensor) state dict gives the full shapes without a gather."""
    return [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in state_dict.items() if k not in skip]


def spec_digest(spec: list[TensorSpec]) -> int:
    """A 63-bit digest of the spec (fits an int64 header): both sides must lay out buckets the same way."""
    return int.from_bytes(hashlib.sha256(repr(spec).encode()).digest()[:8], "little") >> 1


def buckets(spec: list[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive same-dtype runs of the spec, each at most bucket_bytes (a bigger tensor goes alone)."""
    out, cur, size = [], [], 0
    for s in spec:
        nbytes = s.nbytes
        if cur and (s.dtype != cur[0].dtype or size + nbytes > bucket_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += nbytes
    return out + ([cur] if cur else [])


def in_spec_order(items: Iterable[tuple[str, torch.Tensor]], spec: list[TensorSpec]) -> Iterator[torch.Tensor]:
    """The stream's tensors, checked against the spec one by one (names outside it, tied weights, skipped)."""
    names = {s.name for s in spec}
    want = iter(spec)
    for name, tensor in items:
        if name not in names:
            continue
        s = next(want)
        assert (name, tuple(tensor.shape), str(tensor.dtype)) == (s.name, s.shape, s.dtype), \
            f"weight stream out of spec order: got {name} {tuple(tensor.shape)} {tensor.dtype}, spec says {s}"
        yield tensor
    missing = [s.name for s in want]
    assert not missing, f"weight stream ended before the spec: missing {missing[:5]}"


class BroadcastGroup:
    """One process's membership of a learner -> workers broadcast group."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 600.0, host: StoreHost | None = None):
        """host: rank 0's bound listening socket (actors/rendezvous.py), so the store listens only where
        the Ray node does; without it rank 0's store binds the port itself, on every interface."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        if rank == 0 and host is not None:
            self.store = host.store(world_size, timeout_s)
        else:
            self.store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout,
                                       wait_for_workers=False)
        self.pg = BACKENDS[backend](self.store, rank, world_size, timeout)  # blocks until every rank joined
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _agree(self, version: int, digest: int, ok: bool, expected: int | None = None) -> tuple[int, int]:
        """Rank 0 broadcasts (version, digest); every rank votes; all raise together if any refused."""
        header = torch.tensor([version, digest], dtype=torch.int64, device=self.device)
        self.pg.broadcast([header], _root0()).wait()
        sent_version, sent_digest = (int(x) for x in header.tolist())
        if self.rank > 0:
            ok = sent_version == expected and sent_digest == digest
        vote = torch.tensor([int(ok)], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([vote], opts).wait()
        if not ok:
            raise SyncRefused(f"weight broadcast refused: expected version {expected} with spec digest {digest}, "
                              f"the learner sent version {sent_version} with spec digest {sent_digest}"
                              if self.rank > 0 else f"weight broadcast refused: version {version} is not the "
                              f"learner's current one")
        if int(vote.item()) == 0:
            raise SyncRefused(f"weight broadcast of version {sent_version} refused by another rank "
                              f"(a rollout worker expected another version or weight spec; see its error)")
        return sent_version, sent_digest

    def send(self, items: Iterable[tuple[str, torch.Tensor]], spec: list[TensorSpec], version: int,
             bucket_bytes: int = 64 << 20, ok: bool = True) -> None:
        """items: (name, tensor) pairs in spec order, consumed one bucket at a time.
        ok=False: the sender refuses (its version is wrong), after telling the receivers."""
        assert self.rank == 0, f"only the learner (rank 0) sends, this is rank {self.rank}"
        self._agree(version, spec_digest(spec), ok)
        tensors = in_spec_order(items, spec)
        for bucket in buckets(spec, bucket_bytes):
            parts = [next(tensors).detach().reshape(-1) for _ in bucket]
            flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.device)
            del parts  # at most one bucket's tensors and their flat copy are held at a time
            self.pg.broadcast([flat], _root0()).wait()
        for _ in tensors:  # runs the stream's end-of-spec check
            pass

    def receive(self, spec: list[TensorSpec], version: int, bucket_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
        """The weights of `version` (refused, on every rank, if the learner sends another one)."""
        self._agree(-1, spec_digest(spec), True, expected=version)
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


class GroupHolder:
    """Holds one process's BroadcastGroup; a failed collective drops it (see the module docstring)."""

    def __init__(self):
        self.group: BroadcastGroup | None = None

    def join(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str,
             timeout_s: float, host: StoreHost | None = None) -> None:
        self.drop()  # a previous group first: its peers may be gone (a restarted worker)
        self.group = BroadcastGroup(master_addr, master_port, rank, world_size, backend, timeout_s, host)

    def drop(self) -> None:
        self.group = None
        gc.collect()  # the ProcessGroup's destructor closes its sockets, which is what frees the other ranks

    def run(self, what: str, fn, *args):
        """fn(group, *args); a failed collective drops the group and raises a RuntimeError saying `what`."""
        if self.group is None:
            raise RuntimeError(f"{what}: this process is in no weight broadcast group (restarted since it joined, "
                               f"or its last sync failed); the driver re-forms the group")
        try:
            return fn(self.group, *args)
        except SyncRefused:
            raise  # every rank refused together: the group is still in step
        except Exception as e:  # a collective failed, or the weight stream broke off mid-sync
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # outside the except block, so no traceback keeps the group's frames (and sockets) alive
        self.drop()
        raise RuntimeError(f"{what}: {error}")


# ---- driver side: the two sync methods ----------------------------------------------------------------
class ObjectStoreSync:
    """publish: learner rank 0 puts its weights in the object store; deliver: every worker loads them."""

    def __init__(self, learner, pool, **_):
        self.learner, self.pool = learner, pool
        self.ref = None  # None: the workers' initial weights are current

    def connect(self) -> None:
        pass  # nothing to set up: the object store is always there

    def publish(self) -> int:
        self.ref, version = self.learner.publish_weights()
        return version

    def deliver(self, version: int, wait: bool = True) -> list[int]:
        return self.pool.sync_weights(self.ref, version, wait=wait)

    def restore(self, version: int) -> list[int]:
        """After a worker restart: every worker back, holding the last published weights."""
        return self.pool.restore(self.ref, version)


class BroadcastSync:
    """A gloo/NCCL group of learner rank 0 and the rollout workers, formed here and re-formed on restore.

    deliver() queues each worker's receive behind the generate calls it already has (Ray runs an actor's
    calls in order) and starts the learner's send, which blocks learner rank 0 until the slowest worker
    reaches its receive. With asynchronous rollouts (wait=False) the driver goes on at once; the learner's
    next update waits behind that send, i.e. for the generations queued before the sync to finish."""

    def __init__(self, learner, pool, backend: str = "gloo", bucket_bytes: int = 64 << 20, timeout_s: float = 600.0):
        self.learner, self.pool = learner, pool
        self.backend, self.bucket_bytes, self.timeout_s = backend, bucket_bytes, timeout_s
        self.spec: list[TensorSpec] = []

    def connect(self) -> None:
        import ray

        addr, port = self.learner.weight_broadcast_address()
        world = self.pool.num_workers + 1
        workers = self.pool.join_broadcast(addr, port, self.backend, self.timeout_s)  # they wait for rank 0...
        self.spec = ray.get(self.learner.join_weight_broadcast(addr, port, world, self.backend, self.timeout_s))
        ray.get(workers)  # ...which the learner's join is

    def publish(self) -> int:
        return self.learner.weight_version()  # nothing moves until deliver

    def deliver(self, version: int, wait: bool = True) -> list[int]:
        senders = self.learner.send_weights_broadcast(version, self.bucket_bytes)
        return self.pool.receive_broadcast(self.spec, version, self.bucket_bytes, senders, wait)

    def restore(self, version: int) -> list[int]:
        """After a worker restart: every worker back, the group re-formed, the current weights sent again."""
        self.pool.restore(None, version)
        self.connect()
        return self.deliver(version, wait=True)


SYNC_METHODS = {"object_store": ObjectStoreSync, "broadcast": BroadcastSync}


def choose_backend(backend: str, learner_gpus: float, worker_gpus: float) -> str:
    """auto: NCCL when learner rank 0 and every worker hold a GPU, else gloo (CPU tensors)."""
    if backend != "auto":
        return backend
    return "nccl" if learner_gpus > 0 and worker_gpus > 0 and "nccl" in BACKENDS else "gloo"


# ---- this process as the learner (tests, bench/weight_sync.py) ------------------------------------------
def connect_pool(pool, backend: str = "gloo", master_addr: str | None = None,
                 timeout_s: float = 600.0) -> GroupHolder:
    """Forms the group with this process as the learner (rank 0) and the pool's workers as 1..N."""
    import ray

    host = StoreHost(master_addr or ray.util.get_node_ip_address())
    addr, port = host.address
    refs = pool.join_broadcast(addr, port, backend, timeout_s)  # workers block in the rendezvous...
    holder = GroupHolder()
    holder.join(addr, port, 0, pool.num_workers + 1, backend, timeout_s, host)  # ...until rank 0 arrives
    ray.get(refs)
    return holder


def broadcast_weights(pool, holder: GroupHolder, state_dict: dict[str, torch.Tensor], version: int,
                      skip: tuple[str, ...] = (), bucket_bytes: int = 64 << 20) -> list[int]:
    """Learner side of a broadcast sync from this process: workers start receiving, rank 0 sends, all
    load `version`. `skip`: tied weights the receivers rebuild themselves (lm_head tied to the embeddings)."""
    spec = weight_spec(state_dict, skip=skip)
    pool.receive_broadcast(spec, version, bucket_bytes, wait=False)
    holder.run(f"weight broadcast of version {version}", BroadcastGroup.send, state_dict.items(), spec, version,
               bucket_bytes)
    return pool.wait_syncs()
