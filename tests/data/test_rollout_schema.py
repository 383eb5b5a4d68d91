from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.data.rollout_schema import (ROLLOUT_SCHEMA, completions_to_table, read_rollouts, table_to_completions,
                                       table_to_records, write_rollouts)
from dsarl.models import ByteTokenizer, DSAConfig, build_model


@pytest.fixture(scope="module")
def completions():
    cfg = DSAConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2, index_head_dim=8,
                    index_topk=4, intermediate_size=64, attention="sparse")
    tok = ByteTokenizer()
    engine = NativeEngine(build_model(cfg, seed=0), tok, weight_version=3)
    params = SamplingParams(max_new_tokens=6, n=2, top_p=0.9, return_keep_mask=True, return_indices=True)
    return engine.generate([tok.encode("ab", add_bos=True), tok.encode("héllo", add_bos=True)], params)


def test_parquet_roundtrip_is_exact(completions, tmp_path):
    n = len(completions)
    meta = [{"task": "math", "answer": str(i)} for i in range(n)]
    comps = [{"rule": 1.0, "length": -0.5 * i} for i in range(n)]
    table = completions_to_table(completions, group_ids=[f"7-{c.prompt_index}" for c in completions],
                                 metadata=meta, reward_components=comps, rewards=[0.5 * i for i in range(n)])
    assert table.schema.equals(ROLLOUT_SCHEMA) and table.num_rows == n
    write_rollouts(table, tmp_path / "r.parquet")
    back = read_rollouts(tmp_path / "r.parquet")
    records = table_to_records(back)
    for c, r, m, rc in zip(completions, records, meta, comps):
        got = r.completion
        assert (got.prompt_index, got.sample_index, got.prompt_ids, got.token_ids, got.finish_reason, got.text,
                got.weight_version, got.keep_mask) == (c.prompt_index, c.sample_index, c.prompt_ids, c.token_ids,
                                                       c.finish_reason, c.text, 3, c.keep_mask)
        assert got.logprobs == c.logprobs  # fp32 values stored as float32: exact
        assert got.indices == c.indices and torch.equal(got.indices.decode(), c.indices.decode())  # encoded bytes kept
        assert (r.prompt_id, r.group_id, r.metadata, r.reward_components) == (
            str(c.prompt_index), f"7-{c.prompt_index}", m, rc)
    assert [c.token_ids for c in table_to_completions(back)] == [c.token_ids for c in completions]


def test_defaults_and_errors(completions):
    table = completions_to_table(completions)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["metadata"] is None and row["reward"] is None and row["group_id"] == row["prompt_id"] == "0"
    with pytest.raises(ValueError, match="rewards"):
        completions_to_table(completions, rewards=[1.0])
    with pytest.raises((pa.ArrowInvalid, ValueError, TypeError)):
        table_to_records(table.drop_columns(["text"]))


@pytest.fixture(scope="module")
def moe_completions():
    cfg = DSAConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2, index_head_dim=8,
                    index_topk=4, intermediate_size=64, n_routed_experts=8, num_experts_per_tok=3,
                    moe_intermediate_size=8, first_k_dense_replace=1)
    tok = ByteTokenizer()
    engine = NativeEngine(build_model(cfg, seed=1), tok)
    params = SamplingParams(max_new_tokens=5, n=2, return_experts=True)
    return engine.generate([tok.encode("ab", add_bos=True), tok.encode("moe!", add_bos=True)], params)


def test_parquet_roundtrip_keeps_expert_routing_exactly(moe_completions, completions, tmp_path):
    # with a synthetic int16 record (> 256 experts) beside the engine's uint8 ones, and one without any
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    wide = replace(moe_completions[0], experts=torch.randint(0, 32768, (6, 4, 3), dtype=torch.int16, generator=g))
    rows = [*moe_completions, wide, completions[0]]
    write_rollouts(completions_to_table(rows), tmp_path / "r.parquet")
    back = table_to_completions(read_rollouts(tmp_path / "r.parquet"))
    for c, got in zip(rows, back):
        if c.experts is None:
            assert got.experts is None
            continue
        assert got.experts.dtype == c.experts.dtype and got.experts.shape == c.experts.shape
        assert torch.equal(got.experts, c.experts)
    assert moe_completions[0].experts.dtype == torch.uint8  # one byte per id for <= 256 experts
    table = completions_to_table(moe_completions)
    assert table.column("experts")[0].as_py() == moe_completions[0].experts.numpy().tobytes()


def test_a_log_written_before_reward_failed_existed_reads_with_it_null(completions, tmp_path):
    # an older step_N.parquet: the same table without the column (issue #21 item 1 added it)
    old = completions_to_table(completions, rewards=[0.5] * len(completions)).drop_columns(["reward_failed"])
    pq.write_table(old, tmp_path / "old.parquet")
    back = read_rollouts(tmp_path / "old.parquet")
    assert back.schema.equals(ROLLOUT_SCHEMA)
    records = table_to_records(back)
    assert [r.reward_failed for r in records] == [None] * len(completions)  # not recorded, not a made-up False
    assert [r.reward for r in records] == [0.5] * len(completions)
