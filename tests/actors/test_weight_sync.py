"""Broadcast weight sync (gloo on CPU) from this process as the learner to 2 Ray rollout workers."""
import pytest
import ray
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.actors.rollout_workers import RolloutPool
from dsarl.actors.weight_sync import broadcast_weights, buckets, connect_pool, weight_spec
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


@pytest.fixture(scope="module")
def pool():
    ray.init(num_cpus=2, include_dashboard=False)
    yield RolloutPool(2, config=CFG.to_dict(), state_dict=build_model(CFG, seed=0).state_dict())
    ray.shutdown()


def test_broadcast_sync_every_worker_generates_with_new_weights(pool):
    group = connect_pool(pool, backend="gloo")
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    for seed, version in [(1, 4), (2, 5)]:
        new = build_model(CFG, seed=seed)
        broadcast_weights(pool, group, new.state_dict(), version, bucket_bytes=64 << 10)  # several buckets
        assert pool.weight_versions() == [version, version]
        want = NativeEngine(new, TOK).generate(PROMPTS, params)
        for w in pool.workers:  # every worker, not only the ones the shards happen to reach
            got = ray.get(w.generate.remote(PROMPTS, params))
            assert [c.token_ids for c in got] == [c.token_ids for c in want]
            assert {c.weight_version for c in got} == {version}
