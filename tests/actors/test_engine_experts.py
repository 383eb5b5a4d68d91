"""The native engine's recorded MoE routing against a plain uncached forward's, token by token."""

import pytest
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.actors.engine.native import expert_id_dtype
from dsarl.actors.engine.vllm_engine import vllm_request_kwargs
from dsarl.models import ByteTokenizer, DSAConfig, build_model
from fresh_seeds import fresh_seed

TOK = ByteTokenizer()
PROMPTS = [TOK.encode(s, add_bos=True) for s in ["hi", "hello world, how", "a", "the quick brown", "xyz!"]]


def moe_cfg(**kw) -> DSAConfig:
    # initializer_range 0.1: router scores spread enough that no top-k choice is a near-tie in fp32, so
    # the cached decode (absorbed MLA) and the uncached forward choose the same experts. 8 index heads:
    # few heads tie keys at score 0 (see test_engine.py).
    base = dict(vocab_size=264, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                index_n_heads=8, index_head_dim=16, index_topk=4, n_routed_experts=8, n_group=2, topk_group=1,
                num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, initializer_range=0.1,
                max_position_embeddings=128)
    base.update(kw)
    return DSAConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: extra threads only contend
    yield
    torch.set_num_threads(before)


def reference_routing(model, ids: list[int], attention: str) -> torch.Tensor:
    """[S, M, k] experts of a plain uncached forward over ids, MoE layers only."""
    out = model(torch.tensor([ids]), attention=attention, return_experts=True)
    return torch.stack([e[0] for e in out.experts if e is not None], dim=1)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_recorded_experts_are_the_full_forwards_routing(attention):
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed).requires_grad_(False)
    with torch.no_grad():  # a nonzero bias: it steers the choice, so the record must include it
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    # batch 3 < 5 prompts x 2 samples: slots are refilled, and prompts share one prefill per group
    engine = NativeEngine(model, TOK, max_batch_size=3, attention=attention)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=seed, return_experts=True))
    M, k = 2, model.config.num_experts_per_tok
    for c in out:
        P, T = len(c.prompt_ids), len(c.token_ids)
        assert c.experts.dtype == torch.uint8 and c.experts.shape == (P + T - 1, M, k)
        # every fed token: the prompt, then each generated token but the last (never fed)
        want = reference_routing(model, c.prompt_ids + c.token_ids[:-1], attention)  # [P + T - 1, M, k]
        for s in range(P + T - 1):
            for m in range(M):
                got = c.experts[s, m].tolist()
                assert len(set(got)) == k, f"seed {seed}: repeated expert {got}"
                assert set(got) == set(want[s, m].tolist()), f"seed {seed} prompt {c.prompt_ids} token {s} layer {m}"


def test_experts_only_when_asked_and_only_for_moe_models():
    model = build_model(moe_cfg(), seed=0).requires_grad_(False)
    out = NativeEngine(model, TOK, max_batch_size=4).generate(PROMPTS[:2], SamplingParams(max_new_tokens=3))
    assert all(c.experts is None for c in out)
    dense = build_model(moe_cfg(n_routed_experts=None), seed=0).requires_grad_(False)
    out = NativeEngine(dense, TOK, max_batch_size=4).generate(PROMPTS[:2], SamplingParams(max_new_tokens=3,
                                                                                         return_experts=True))
    assert all(c.experts is None for c in out)


def test_expert_ids_take_the_smallest_exact_dtype():
    assert [expert_id_dtype(n) for n in (8, 256, 257, 32768, 32769)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32]
    assert torch.iinfo(torch.uint8).max == 255 and torch.iinfo(torch.int16).max == 32767


def test_vllm_refuses_to_record_experts():
    with pytest.raises(ValueError, match="return_experts"):
        vllm_request_kwargs(SamplingParams(return_experts=True), 0, None)
    assert vllm_request_kwargs(SamplingParams(), 0, None)["n"] == 1
