"""Broadcast weight sync (gloo on CPU): the group's protocol between threads of this process, and this
process as the learner sending to 2 Ray rollout workers. The GRPO driver's use of it (learner rank 0
as an actor, sync.method) is tested in tests/launch/test_sync_method.py."""
import threading

import pytest
import ray
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.actors.rollout_workers import RolloutPool
from dsarl.actors.weight_sync import (BroadcastGroup, GroupHolder, SyncRefused, broadcast_weights, buckets,
                                      connect_pool, weight_spec)
from dsarl.launch.ray_setup import free_ports
from dsarl.models import ByteTokenizer, DSAConfig, build_model

TOK = ByteTokenizer()
CFG = DSAConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, index_n_heads=8, index_head_dim=16,
                index_topk=6, intermediate_size=128, initializer_range=0.1, max_position_embeddings=128)
PROMPTS = [TOK.encode(s, add_bos=True) for s in ["a", "hello", "x y z"]]


def test_buckets_keep_order_dtype_and_size():
    state = {"a": torch.zeros(10), "b": torch.zeros(300), "c": torch.zeros(5, dtype=torch.bfloat16),
             "d": torch.zeros(2), "e": torch.zeros(1)}
    spec = weight_spec(state, skip=("e",))
    out = buckets(spec, bucket_bytes=1024)
    assert [[s.name for s in b] for b in out] == [["a"], ["b"], ["c"], ["d"]]
    assert [[s.name for s in b] for b in buckets(spec, 1 << 20)] == [["a", "b"], ["c"], ["d"]]


def run_ranks(world: int, fn):
    """fn(rank, holder) on `world` threads, each a member of one fresh gloo group; returns
    {rank: result or the exception it raised}."""
    port, out = free_ports(1)[0], {}

    def body(rank):
        holder = GroupHolder()
        try:
            holder.join("127.0.0.1", port, rank, world, "gloo", 60.0)
            out[rank] = fn(rank, holder)
        except Exception as e:  # noqa: BLE001  (the test reads it)
            out[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a rank is still blocked in a collective"
    return out


def mixed_state(seed: int) -> dict[str, torch.Tensor]:
    """Fresh random tensors of several dtypes and awkward sizes, dtype runs interleaved."""
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(37, 11, generator=g), "scale": torch.randn(63, generator=g).bfloat16(),
            "big": torch.randn(50_000, generator=g), "steps": torch.randint(0, 1 << 40, (7,), generator=g),
            "w16": torch.randn(3, 5, generator=g).half(), "tail": torch.randn(1, generator=g)}


def test_streamed_buckets_deliver_every_dtype_bit_for_bit():
    state = mixed_state(0)
    spec = weight_spec(state)

    def fn(rank, holder):
        if rank == 0:  # the stream is a generator: the sender sees one tensor at a time
            return holder.run("send", BroadcastGroup.send, (kv for kv in state.items()), spec, 7, 4096)
        return holder.run("receive", BroadcastGroup.receive, spec, 7, 4096)

    out = run_ranks(3, fn)
    for rank in (1, 2):
        got = out[rank]
        assert list(got) == list(state)
        for k, v in state.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (rank, k)


def test_a_version_mismatch_is_refused_by_every_rank_and_the_group_stays_usable():
    state = mixed_state(1)
    spec = weight_spec(state)

    def fn(rank, holder):
        errors = []
        try:  # the learner sends version 4 to workers told to expect 5 (worker 2) and 4 (worker 1)
            if rank == 0:
                holder.run("send", BroadcastGroup.send, state.items(), spec, 4, 1 << 20)
            else:
                holder.run("receive", BroadcastGroup.receive, spec, {1: 4, 2: 5}[rank], 1 << 20)
        except SyncRefused as e:
            errors.append(str(e))
        # the refusal happened before any bucket moved: the same group carries the next sync
        if rank == 0:
            holder.run("send", BroadcastGroup.send, state.items(), spec, 5, 1 << 20)
            return errors, None
        return errors, holder.run("receive", BroadcastGroup.receive, spec, 5, 1 << 20)

    out = run_ranks(3, fn)
    assert "refused by another rank" in out[0][0][0] and "refused by another rank" in out[1][0][0]
    assert "expected version 5" in out[2][0][0] and "sent version 4" in out[2][0][0]
    for rank in (1, 2):
        assert all(torch.equal(out[rank][1][k], v) for k, v in state.items())


def test_a_weight_stream_out_of_spec_order_fails_every_rank_instead_of_hanging():
    state = mixed_state(2)
    spec = weight_spec(state)
    shuffled = list(state.items())[::-1]

    def fn(rank, holder):
        if rank == 0:
            return holder.run("send", BroadcastGroup.send, shuffled, spec, 1, 1 << 20)
        return holder.run("receive", BroadcastGroup.receive, spec, 1, 1 << 20)

    out = run_ranks(3, fn)
    assert isinstance(out[0], RuntimeError) and "out of spec order" in str(out[0])
    # the sender dropped its group, so the receivers' collectives failed at once, not at their timeout
    assert all(isinstance(out[r], RuntimeError) and "receive" in str(out[r]) for r in (1, 2))


@pytest.fixture(scope="module")
def pool():
    ray.init(num_cpus=2, include_dashboard=False)
    yield RolloutPool(2, config=CFG.to_dict(), state_dict=build_model(CFG, seed=0).state_dict())
    ray.shutdown()


def test_broadcast_sync_every_worker_generates_with_new_weights(pool):
    holder = connect_pool(pool, backend="gloo")
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    for seed, version in [(1, 4), (2, 5)]:
        new = build_model(CFG, seed=seed)
        versions = broadcast_weights(pool, holder, new.state_dict(), version, skip=("lm_head.weight",),
                                     bucket_bytes=64 << 10)  # several buckets
        assert versions == [version, version] == pool.weight_versions()
        want = NativeEngine(new, TOK).generate(PROMPTS, params)
        for w in pool.workers:  # every worker, not only the ones the shards happen to reach
            got = ray.get(w.generate.remote(PROMPTS, params))
            assert [c.token_ids for c in got] == [c.token_ids for c in want]
            assert {c.weight_version for c in got} == {version}
            held = ray.get(w.state_dict.remote())
            assert all(torch.equal(held[k], v) for k, v in new.state_dict().items())
