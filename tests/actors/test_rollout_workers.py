"""RolloutPool on a real local Ray instance (2 workers) against a local NativeEngine."""
import pytest
import ray
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.actors.rollout_workers import RolloutPool, RolloutWorker
from dsarl.models import ByteTokenizer, DSAConfig, build_model, save_pretrained

TOK = ByteTokenizer()
CFG = DSAConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, index_n_heads=8, index_head_dim=16,
                index_topk=6, intermediate_size=128, initializer_range=0.1, max_position_embeddings=128,
                attention="sparse")
PROMPTS = [TOK.encode(s, add_bos=True) for s in ["a", "bb", "hello", "x y z", "the end", "??", "0123456"]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(build_model(CFG, seed=0), d, TOK)
    return d


@pytest.fixture(scope="module")
def pool(ckpt):
    ray.init(num_cpus=2, include_dashboard=False)
    yield RolloutPool(2, ckpt, num_cpus_per_worker=1, engine_kwargs={"max_batch_size": 4})
    ray.shutdown()


def local_engine(seed=0) -> NativeEngine:
    return NativeEngine(build_model(CFG, seed=seed).requires_grad_(False), TOK)


def test_pool_returns_all_completions_in_prompt_order(pool):
    params = SamplingParams(max_new_tokens=8, n=2, seed=4, top_p=0.9)
    got = pool.generate(PROMPTS, params)
    assert [(c.prompt_index, c.sample_index) for c in got] == [(i, j) for i in range(len(PROMPTS)) for j in range(2)]
    assert [c.prompt_ids for c in got[::2]] == PROMPTS
    want = local_engine().generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]  # shards sample as one engine
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    assert pool.generate(PROMPTS[:1], params)[0].token_ids == want[0].token_ids  # fewer prompts than workers


def test_pool_scores_and_judges(pool):
    done = pool.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=5))
    scores = pool.score([c.prompt_ids for c in done], [c.token_ids for c in done])
    for c, s in zip(done, scores):
        torch.testing.assert_close(torch.tensor(s), torch.tensor(c.logprobs), rtol=0, atol=1e-5)
    ref = local_engine().yes_probability(["Q? A:", "ok", "x"])
    assert pool.yes_probability(["Q? A:", "ok", "x"]) == pytest.approx(ref, rel=1e-6)


def test_object_store_sync_reaches_every_worker(pool):
    new = build_model(CFG, seed=1)
    assert pool.sync_weights(new.state_dict(), version=3) == [3, 3]
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    got = pool.generate(PROMPTS, params)
    want = local_engine(seed=1).generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert {c.weight_version for c in got} == {3} and pool.weight_versions() == [3, 3]


def test_worker_without_ray_from_config():
    state = build_model(CFG, seed=2).state_dict()
    worker = RolloutWorker(config=CFG.to_dict(), state_dict=state)
    out = worker.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert [c.token_ids for c in out] == [c.token_ids for c in local_engine(seed=2).generate(
        PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=4))]
    with pytest.raises(ValueError, match="engine"):
        RolloutWorker(config=CFG.to_dict(), engine="nope")
