"""The replay codec keeps every row's selected set and padding exactly (data/index_codec.py).

Reference: a row's canonical form written out in plain Python (sorted set, then its -1 padding)."""
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.data.index_codec import (CHAIN, PackedIndices, canonical_rows, decode_indices, encode_indices,
                                    prefix_indices, replay_rows, varint_decode, varint_encode)
from dsarl.data.rollout_schema import completions_to_table, table_to_completions, with_current_columns
from dsarl.models import ByteTokenizer, DSAConfig, build_model


def plain_canonical(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape, -1, dtype=np.int32)
    for pos in np.ndindex(x.shape[:-1]):
        row = sorted(v for v in x[pos].tolist() if v >= 0)
        out[pos][: len(row)] = row
    return out


def assert_round_trip(x: np.ndarray) -> None:
    want = plain_canonical(x)
    assert np.array_equal(canonical_rows(torch.from_numpy(x)).numpy(), want)
    for delta in (True, False):
        for compress in (True, False):
            packed = encode_indices(torch.from_numpy(x), delta=delta, compress=compress)
            got = decode_indices(packed)
            assert got.dtype == torch.int32 and tuple(got.shape) == x.shape == packed.shape
            assert np.array_equal(got.numpy(), want), (delta, compress)


@st.composite
def selections(draw):
    """[T, L, K] rows: random sets, prefix rows 0..n-1, and rows that edit the previous row of their
    layer (the DELTA mode's case), each with some -1 padding, shuffled within the row."""
    T, L, K = draw(st.integers(0, 90)), draw(st.integers(1, 3)), draw(st.integers(1, 12))
    span = draw(st.sampled_from([K, 2 * K, 40, 5000, 2**31 - 2]))  # key positions 0..span-1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = np.full((T, L, K), -1, dtype=np.int64)
    for layer in range(L):
        prev = None
        for t in range(T):
            kind = rng.integers(4)
            n = int(rng.integers(0, min(K, span) + 1))
            if kind == 0 and n <= span:
                row = np.arange(n)
            elif kind >= 2 and prev is not None:
                keep = prev[rng.random(len(prev)) < 0.8][:n]
                extra = rng.choice(span, size=min(span, n + K), replace=False) if span < 10**6 else \
                    rng.integers(0, span, n + K)
                row = np.concatenate([keep, extra[~np.isin(extra, keep)]])[:n]
                row = np.unique(row)[:n]
            else:
                row = np.unique(rng.integers(0, span, n))
            prev = row
            x[t, layer, : len(row)] = rng.permutation(row)
            x[t, layer] = rng.permutation(x[t, layer])  # padding anywhere in the row
    return x


@settings(max_examples=60, deadline=None)
@given(selections())
def test_decode_of_encode_is_the_canonical_selection(x):
    assert_round_trip(x)


def test_edge_cases():
    assert_round_trip(np.zeros((0, 2, 4), dtype=np.int64))  # no token
    assert_round_trip(np.array([[[3, -1, 0, -1]]]))  # single token, padding between keys
    assert_round_trip(np.full((3, 2, 5), -1))  # nothing selected
    assert_round_trip(np.array([[[0]], [[1]], [[2**31 - 2]]]))  # K = 1, the largest key
    # K > T and a prompt shorter than K: query p sees keys 0..p, all selected, -1 after
    P, T, K = 3, 9, 16
    x = np.full((T, 2, K), -1)
    for t in range(T):
        x[t, :, : P + t] = np.arange(P + t)[::-1]  # best first, as top-k returns them
    assert_round_trip(x)
    rows = 2 * T
    assert encode_indices(x).nbytes <= rows + 16  # such rows cost their length only, not K keys


@pytest.mark.parametrize("first_n, T, L, K", [(1, 1, 1, 1), (3, 9, 2, 16), (17, 16, 4, 256), (5, 0, 3, 8),
                                             (40, 217, 2, 256)])
def test_a_prefix_record_is_the_encoding_of_its_all_visible_rows(first_n, T, L, K):
    """prefix_indices writes, from the counts, exactly the bytes encode_indices makes of the rows an engine
    that selected every visible key would record: token t's rows hold keys 0..first_n + t - 1, best
    first (any order: the codec keeps the set), in every layer."""
    x = np.full((T, L, K), -1, dtype=np.int64)
    for t in range(T):
        x[t, :, : first_n + t] = np.arange(first_n + t)[::-1]
    for compress in (True, False):
        got = prefix_indices(first_n, T, L, K, compress=compress)
        assert got == encode_indices(x, compress=compress)
        assert np.array_equal(decode_indices(got).numpy(), plain_canonical(x))
    with pytest.raises(ValueError, match="do not fit"):
        prefix_indices(first_n, K - first_n + 2, L, K)


def test_long_chains_of_small_changes_are_exact_and_small():
    # a sliding window: every step adds key q and drops q - K; chains are cut every CHAIN rows
    T, K = 3 * CHAIN + 5, 32
    x = np.stack([np.arange(t + 100 - K, t + 100) for t in range(T)])[:, None, :]  # [T, 1, K]
    x = np.ascontiguousarray(np.random.default_rng(0).permuted(x, axis=-1))
    assert_round_trip(x)
    assert encode_indices(x).nbytes < x.size * 4 / 16


def test_bad_input_fails_naming_the_problem():
    with pytest.raises(ValueError, match="twice"):
        encode_indices(torch.tensor([[[1, 1, 2]]]))
    with pytest.raises(ValueError, match=r">= 0 or -1"):
        encode_indices(torch.tensor([[[1, -2, 2]]]))
    with pytest.raises(ValueError, match=r"\[T, L, K\]"):
        encode_indices(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="integers"):
        encode_indices(torch.zeros(1, 1, 2))
    packed = encode_indices(torch.tensor([[[1, 2]]]))
    with pytest.raises(ValueError, match="shape"):
        decode_indices(PackedIndices((2, 1, 2), packed.data))


def test_varints_round_trip():
    v = np.concatenate([np.arange(300), np.random.default_rng(1).integers(0, 2**62, 1000), [2**63 - 1, 0]])
    assert np.array_equal(varint_decode(varint_encode(v)), v)
    assert len(varint_encode(np.array([127, 128, 16383, 16384]))) == 1 + 2 + 2 + 3
    # LEB128 bytes, written out: low 7 bits first, high bit set while more follow (one-byte streams take a
    # shortcut on both sides, longer ones the per-byte passes)
    assert varint_encode(np.array([0, 1, 127])) == bytes([0, 1, 127])
    assert varint_encode(np.array([0, 127, 128, 300])) == bytes([0, 127, 0x80, 0x01, 0xAC, 0x02])
    assert varint_decode(bytes([0, 1, 127])).tolist() == [0, 1, 127]
    assert varint_decode(bytes([0, 127, 0x80, 0x01, 0xAC, 0x02])).tolist() == [0, 127, 128, 300]
    assert varint_encode(np.zeros(0, dtype=np.int64)) == b"" and varint_decode(b"").size == 0


@pytest.fixture(scope="module")
def sparse_model():
    cfg = DSAConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2, index_head_dim=8,
                    index_topk=8, intermediate_size=64, attention="sparse")
    return build_model(cfg, seed=5)


def test_real_selections_of_the_indexer_round_trip(sparse_model):
    """The model's own selections (best first, -1 padded below K visible keys) at every query."""
    ids = torch.randint(0, 256, (3, 70), generator=torch.Generator().manual_seed(0))
    out = sparse_model(ids, attention="sparse", return_indices=True)
    for b in range(ids.shape[0]):
        x = torch.stack([layer[b] for layer in out.indices], dim=1)  # [T, L, K]
        assert (x == -1).any() and (x >= 8).any()  # both short (padded) and long rows
        assert_round_trip(x.numpy())


def test_engine_records_are_exact_and_survive_parquet(sparse_model):
    """The engine hands over encoded records: they decode to valid selections, and re-encoding the
    decoded rows gives the same bytes (encode is a function of the sets, so nothing was lost)."""
    tok = ByteTokenizer()
    engine = NativeEngine(sparse_model, tok, max_batch_size=3, attention="sparse")
    prompts = [tok.encode("a longer prompt than k keys", add_bos=True), tok.encode("ab", add_bos=True)]
    comps = engine.generate(prompts, SamplingParams(max_new_tokens=12, n=2, return_indices=True, seed=1))
    for c in comps:
        assert isinstance(c.indices, PackedIndices)
        x = c.indices.decode()
        assert tuple(x.shape) == (len(c.token_ids), 3, 8)
        for t in range(x.shape[0]):
            q = len(c.prompt_ids) - 1 + t  # the query that produced token t sees keys 0..q
            for row in x[t]:
                keys = row[row >= 0]
                assert len(keys) == min(8, q + 1) and bool((keys <= q).all())
        assert encode_indices(x).data == c.indices.data
    back = table_to_completions(pa.Table.from_batches(completions_to_table(comps).to_batches()))
    assert [b.indices for b in back] == [c.indices for c in comps]
    # a log from before the codec (flat int32 lists) reads back encoded, same sets
    legacy = completions_to_table(comps)
    flat = pa.array([c.indices.decode().flatten().tolist() for c in comps], pa.list_(pa.int32()))
    legacy = legacy.set_column(legacy.schema.get_field_index("indices"), "indices", flat)
    for b, c in zip(table_to_completions(with_current_columns(legacy)), comps):
        assert torch.equal(replay_rows(b.indices), replay_rows(c.indices))
