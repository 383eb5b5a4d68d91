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
from dsarl.kernels import dispatch, native
from dsarl.kernels.index_codec import RepeatedKey
from dsarl.kernels.index_codec import cpu as codec_cpu
from dsarl.kernels.index_codec.reference import cost_bits, encode_rows_reference, pack_modes, varint_lengths
from dsarl.models import ByteTokenizer, DSAConfig, build_model

needs_c = pytest.mark.skipif(not native.available(codec_cpu.SOURCE), reason="the C row coder needs a C compiler")
DECODERS = ("reference", "cpu") if native.available(codec_cpu.SOURCE) else ("reference",)


def plain_canonical(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape, -1, dtype=np.int32)
    for pos in np.ndindex(x.shape[:-1]):
        row = sorted(v for v in x[pos].tolist() if v >= 0)
        out[pos][: len(row)] = row
    return out


def assert_round_trip(x: np.ndarray) -> None:
    """Encoded as dispatch chooses (C here), decoded by every decoder that runs here."""
    want = plain_canonical(x)
    assert np.array_equal(canonical_rows(torch.from_numpy(x)).numpy(), want)
    for delta in (True, False):
        for compress in (True, False):
            packed = encode_indices(torch.from_numpy(x), delta=delta, compress=compress)
            for backend in DECODERS:
                with dispatch.forcing(backend):
                    got = decode_indices(packed)
                assert got.dtype == torch.int32 and tuple(got.shape) == x.shape == packed.shape
                assert np.array_equal(got.numpy(), want), (delta, compress, backend)


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


def assert_same_rows(x) -> None:
    """The C row coder writes the numpy reference's modes, counts and payload, byte for byte, with and
    without DELTA rows and deflate's cost."""
    idx = torch.as_tensor(x).to(torch.int32)
    for delta in (True, False):
        for compress in (True, False):
            want = encode_rows_reference(idx, delta, compress, CHAIN)
            got = codec_cpu.encode_rows_cpu(idx, delta, compress, CHAIN)
            assert np.array_equal(got[0], want[0]) and got[1:] == want[1:], (delta, compress)


@needs_c
def test_the_c_row_coder_costs_numbers_as_the_reference():
    """The mode choice compares sums of these integers, so any difference could change the bytes."""
    p = 2 ** np.arange(1, 41, dtype=np.int64)
    v = np.concatenate([np.arange(70000), p[1:] - 3, p - 2, p - 1, p, p + 1,
                        np.random.default_rng(0).integers(0, 2**40, 5000)])
    assert np.array_equal(codec_cpu.costs_cpu(v), cost_bits(v))
    assert np.array_equal(codec_cpu.costs_cpu(v, compress=False), varint_lengths(v))
    assert cost_bits(np.array([0, 2, 6, 4094])).tolist() == [256, 512, 768, 3072]  # 256 log2(v + 2)


@needs_c
@settings(max_examples=60, deadline=None)
@given(selections())
def test_the_c_row_coder_writes_the_reference_bytes(x):
    assert_same_rows(x)


@needs_c
def test_the_c_row_coder_across_chunks_and_on_real_rows(sparse_model, monkeypatch):
    """Records split into chunks of a few rows (a DELTA row's previous row in the chunk before), and the
    indexer's own selections."""
    T, K = 2 * CHAIN + 9, 16
    x = np.stack([np.arange(t + 50 - K, t + 50) for t in range(T)])[:, None, :].repeat(2, axis=1)  # [T, 2, K]
    x = np.ascontiguousarray(np.random.default_rng(3).permuted(x, axis=-1))
    for rows in (1, 3, 64):
        monkeypatch.setattr(codec_cpu, "CHUNK_BYTES", rows * 10 * K)
        assert_same_rows(x)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))
    out = sparse_model(ids, attention="sparse", return_indices=True)
    for b in range(ids.shape[0]):
        assert_same_rows(torch.stack([layer[b] for layer in out.indices], dim=1))


@needs_c
@pytest.mark.parametrize("span", [40, 2**31 - 2])  # the bitmap sort, and qsort for rows spread too wide
def test_both_row_coders_name_the_row_holding_a_key_twice(span, monkeypatch):
    x = np.full((5, 3, 4), -1, dtype=np.int32)
    x[:, :, 0], x[:, :, 1] = 1, 7 if span == 40 else span - 1
    x[3, 2, 2] = x[3, 2, 1]  # token 3, layer 2
    for rows in (1, 64):  # chunks of one row, and one chunk
        monkeypatch.setattr(codec_cpu, "CHUNK_BYTES", rows * 10 * 4)
        for coder in (encode_rows_reference, codec_cpu.encode_rows_cpu):
            with pytest.raises(RepeatedKey, match=r"token 3, layer 2\)"):
                coder(torch.from_numpy(x), True, True, CHAIN)


@needs_c
def test_the_c_decoder_names_what_is_corrupt():
    T, K = 12, 8  # a sliding window: DELTA rows after the first
    x = np.stack([np.arange(t + 20 - K, t + 20) for t in range(T)])[:, None, :].astype(np.int32)
    mode, counts, payload = encode_rows_reference(torch.from_numpy(x))
    assert (mode[1:] == 2).all()  # DELTA
    modes = pack_modes(mode)
    assert np.array_equal(codec_cpu.decode_rows_cpu(modes, counts, payload, T, 1, K).numpy(), x)
    first_delta = pack_modes(np.full(T, 2))  # the first row has no previous row
    unknown = bytes([modes[0] | 3]) + modes[1:]  # mode 3 in row 0
    for streams, K_, reason in [((modes, counts, payload[:-1]), K, "payload ends early"),
                                ((modes, counts, payload + b"\x00"), K, "left over"),
                                ((modes, counts[:-1], payload), K, "counts stream"),
                                ((modes, counts, payload[:-1] + bytes([payload[-1] | 0x80])), K, "inside a number"),
                                ((modes[:1], counts, payload), K, "row modes end early"),
                                ((modes, counts, payload), K - 1, "more than K keys"),
                                ((first_delta, counts, payload), K, "without a previous row"),
                                ((unknown, counts, payload), K, "unknown row mode")]:
        with pytest.raises(ValueError, match=f"corrupt: .*{reason}"):
            codec_cpu.decode_rows_cpu(*streams, T, 1, K_)


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
