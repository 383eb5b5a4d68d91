import pytest
import torch

from dsarl.kernels import indexer_topk, native, topk_indices
from dsarl.kernels.indexer_scores.reference import indexer_scores_reference
from dsarl.kernels.topk import cpu as topk_cpu
from dsarl.kernels.topk.chunked import indexer_topk_chunked
from dsarl.kernels.topk.reference import topk_indices_reference
from kernel_utils import DEVICE


def _as_sets(idx: torch.Tensor) -> list[set[int]]:
    """STYLE rule 19: selections compare as sets (ties may resolve in any order); -1 kept as a count."""
    return [set(r.tolist()) | {(-1, int((r < 0).sum()))} for r in idx.reshape(-1, idx.shape[-1])]


def _distinct_scores(gen, B, T, S):
    """Causal scores with distinct finite values (no ties, so the top-k set is unique)."""
    scores = torch.randperm(B * T * S, generator=gen).float().view(B, T, S)
    q_pos = torch.arange(S - T, S).expand(B, T)
    mask = torch.arange(S)[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    return scores.masked_fill(~mask, float("-inf")).to(DEVICE)


@pytest.mark.parametrize("B,T,S,k", [(1, 5, 5, 3), (2, 13, 29, 8), (1, 7, 7, 12)])  # k > S too
def test_public_op_matches_reference_as_sets(gen, B, T, S, k):
    scores = _distinct_scores(gen, B, T, S)
    got = topk_indices(scores, k)
    ref = topk_indices_reference(scores, k)
    assert got.dtype == torch.int32 and got.shape == (B, T, k)
    assert _as_sets(got) == _as_sets(ref)


def test_reference_pads_and_puts_the_best_first(gen):
    """Queries with fewer than k visible keys are -1 padded at the end; the best key comes first."""
    scores = _distinct_scores(gen, 2, 11, 11)
    got = topk_indices_reference(scores, 6)
    assert (got[:, 0, 1:] == -1).all() and (got[:, 0, 0] == 0).all()
    best = scores.gather(-1, got[..., :1].long())  # best first
    assert torch.equal(best, scores.max(-1, keepdim=True).values)


def test_public_ops_every_backend(gen, monkeypatch):
    B, T, S, H, D = 1, 9, 9, 3, 8
    q = torch.rand(B, T, H, D, generator=gen).to(DEVICE)  # positive logits: no ReLU zeros, no ties
    w = torch.rand(B, T, H, generator=gen).to(DEVICE)
    k = torch.rand(B, S, D, generator=gen).to(DEVICE)
    ref = topk_indices_reference(indexer_scores_reference(q, w, k), 4)
    backends = ["reference", "triton"] + (["cpu"] if DEVICE == "cpu" and native.available(topk_cpu.SOURCE) else [])
    for backend in backends:
        monkeypatch.setenv("DSARL_KERNELS", backend)  # triton: the scores (top-k has no Triton kernel)
        assert _as_sets(indexer_topk(q, w, k, 4, chunk=4)) == _as_sets(ref)
        assert _as_sets(topk_indices(indexer_scores_reference(q, w, k), 4)) == _as_sets(ref)


def test_ties_at_the_threshold_go_to_the_latest_keys():
    from dsarl.kernels.topk.reference import topk_indices_reference

    inf = float("-inf")
    scores = torch.tensor([[[3.0, 0.0, 0.0, 1.0, 0.0, 0.0, inf]]])  # k=3: 3.0, 1.0, then one of four zeros
    sel = set(topk_indices_reference(scores, 3)[0, 0].tolist())
    assert sel == {0, 3, 5}
    # the same scores with padding slots (-inf) between them select the same keys by recency
    padded = torch.tensor([[[3.0, 0.0, inf, inf, 0.0, 1.0, 0.0, 0.0]]])
    assert set(topk_indices_reference(padded, 3)[0, 0].tolist()) == {0, 5, 7}
    few = torch.tensor([[[0.0, inf, 0.0]]])
    assert topk_indices_reference(few, 4)[0, 0].tolist().count(-1) == 2


needs_native = pytest.mark.skipif(not native.available(topk_cpu.SOURCE),
                                  reason="the C kernels need a C compiler (cc/gcc/clang)")


@needs_native
@pytest.mark.parametrize("B,T,S,k", [(1, 5, 5, 3), (2, 37, 61, 8), (1, 7, 7, 12), (3, 64, 300, 32),
                                     (2, 40, 2003, 8),  # long rows: block-pruned, ragged tail
                                     (2, 30, 3000, 64),  # the C kernel's sampled threshold at k / 8 = 8
                                     (2, 60, 200, 64)])  # rows shorter than 4k: every score sampled
def test_cpu_selection_equals_the_reference_with_many_ties(gen, B, T, S, k):
    """Indexer-like scores: ReLU sums that are exactly 0 on many keys, rows of both signs (so -0.0
    appears: a negative weight times a zero), repeated positive values, causal -inf. The selected
    sets must be the reference's exactly: ties at the k-th score go to the later slots."""
    relu = torch.relu(torch.randn(B, T, S, generator=gen)).round(decimals=1)  # many exact ties
    sign = torch.where(torch.rand(B, T, 1, generator=gen) < 0.5, -1.0, 1.0)
    scores = relu * sign
    assert (scores.signbit() & (scores == 0)).any()  # -0.0 is present
    q_pos = torch.arange(S - T, S).expand(B, T)
    scores = scores.masked_fill(torch.arange(S)[None, None, :] > q_pos[:, :, None], float("-inf"))
    got, ref = topk_cpu.topk_indices_cpu(scores, k), topk_indices_reference(scores, k)
    assert got.dtype == torch.int32 and got.shape == (B, T, k)
    assert _as_sets(got) == _as_sets(ref)
    valid = got >= 0  # best first: the selected scores never increase along the row
    vals = scores.gather(-1, got.clamp(min=0).long()).masked_fill(~valid, float("-inf"))
    assert (vals[..., 1:] <= vals[..., :-1]).all()


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_selection_split_over_threads_equals_the_reference(gen, threads, monkeypatch):
    """Rows split over pool threads and the caller's own (native.parallel), as a long decode batch runs."""
    monkeypatch.setattr(native, "MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    scores = _distinct_scores(gen, 5, 9, 300)
    got = topk_cpu.topk_indices_cpu(scores, 24)
    assert torch.equal(got, topk_indices_reference(scores, 24))  # distinct scores: one answer, in order


@needs_native
def test_cpu_topk_when_the_sampled_threshold_is_too_high(gen):
    """The C kernel guesses a threshold from every 8th score; when fewer than k scores reach the guess
    (the best scores all sit on sampled slots) it must fall back to the whole row, not return fewer."""
    S, k = 400, 16  # the guess is the 3rd best sampled score
    scores = torch.rand(1, 3, S, generator=gen)
    scores[0, :, [0, 8, 16]] = 10.0  # exactly 3 scores reach the guess: 3 < k
    scores[0, 2, 200:] = float("-inf")  # and a row with a causal tail
    got = topk_cpu.topk_indices_cpu(scores, k)
    assert _as_sets(got) == _as_sets(topk_indices_reference(scores, k))
    assert (got >= 0).all()


@needs_native
@pytest.mark.parametrize("B,T,S,H,D,k,scaled,invalid", [
    (1, 5, 5, 3, 8, 3, False, None),  # k > visible keys for early queries
    (2, 37, 61, 4, 32, 8, True, None),  # fp8-style k_scale
    (2, 40, 300, 5, 24, 16, False, "shuffled"),  # k_pos out of order with an invalid (-1) slot: no prefix cut
    (2, 40, 300, 5, 24, 16, True, "prefix"),  # sorted k_pos whose first slots are invalid (-1): left padding
    (1, 64, 700, 8, 32, 32, True, None),  # two groups of 4 heads, S not a multiple of the key block
    (1, 50, 3000, 6, 20, 64, False, None),  # long rows: the sampled threshold and radix sort
    (3, 41, 2000, 4, 16, 32, False, None),  # odd T: query pairs meet batch ends; rows split by work
    (4, 1, 500, 4, 32, 64, False, None),  # a decode step: one query per sequence, the last position
])
@pytest.mark.parametrize("path", ["fused", "matmul_then_topk", "blocked"])
def test_cpu_fused_indexer_topk_matches_scores_then_reference(gen, B, T, S, H, D, k, scaled, invalid, path,
                                                              monkeypatch):
    """Every way the CPU backend computes it: the fused C kernel (long query blocks), matmul scores then
    the C top-k (few queries per sequence: decode), and the fused kernel on keys given in its layout (a
    KV cache's mirror: batch rows further apart than the keys need, stale huge keys past S)."""
    from dsarl.kernels.indexer_scores.reference import resolve_positions

    monkeypatch.setattr(topk_cpu, "FEW_QUERIES", 0 if path == "fused" else 10**9)

    q, w = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, H, generator=gen)
    keys = torch.randn(B, S, D, generator=gen)
    k_scale = torch.rand(B, S, generator=gen) if scaled else None
    q_pos, k_pos = resolve_positions(B, T, S, "cpu")
    if invalid == "shuffled":
        k_pos = k_pos.clone()
        k_pos[:, 5] = -1
        k_pos = k_pos[:, torch.randperm(S, generator=gen)]
    elif invalid == "prefix":  # still non-decreasing: the kernel's sorted path
        k_pos = k_pos.clone()
        k_pos[0, :7] = -1
        k_pos[1, :S - 5] = -1  # most queries of this sequence see nothing, the last few see a few keys
    blocked = None
    if path == "blocked":
        kb, blocks = topk_cpu.KEY_BLOCK, -(-S // topk_cpu.KEY_BLOCK) + 2
        buf = torch.full((2 * B, blocks, D, kb), 1e3)[::2]  # every other row: a batch stride of 2 rows
        slot = torch.arange(S)
        buf[:, slot // kb, :, slot % kb] = keys.transpose(0, 1)  # [S, B, D] -> slot s of every batch row
        blocked = buf
    got = topk_cpu.indexer_topk_cpu(q, w, keys, k, q_pos, k_pos, k_scale, k_blocked=blocked)
    scores = indexer_scores_reference(q, w, keys, q_pos, k_pos, k_scale)
    assert _as_sets(got) == _as_sets(topk_indices_reference(scores, k))
    vals = scores.gather(-1, got.clamp(min=0).long()).masked_fill(got < 0, float("-inf"))
    assert (vals[..., 1:] <= vals[..., :-1]).all()  # best first


@needs_native
def test_cpu_selection_of_a_row_of_equal_scores_is_the_latest_keys(gen):
    """Every visible score tied (an untrained indexer's zeros, as +0.0 and -0.0): recency alone decides,
    on rows sampled whole (shorter than 4k), on the heap path and on the sampled-threshold path (long rows)."""
    for S, k in [(40, 8), (4000, 64), (200, 64)]:
        scores = torch.zeros(2, 3, S)
        scores[0] = -0.0
        scores[1, :, S // 2:] = float("-inf")  # the latest visible keys are in the middle
        scores[1, 0, :] = torch.where(torch.rand(S, generator=gen) < 0.5, 0.0, -0.0)
        scores[1, 0, S // 2:] = float("-inf")
        got = topk_cpu.topk_indices_cpu(scores, k)
        assert _as_sets(got) == _as_sets(topk_indices_reference(scores, k))
        assert set(got[0, 0].tolist()) == set(range(S - k, S))
        assert set(got[1, 0].tolist()) == set(range(S // 2 - k, S // 2))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_indexer_topk_chunks_with_arbitrary_positions(gen, chunk):
    """Each chunk scores only the key slots some query of it can see: with padded keys (-1), keys in
    no particular order and queries that see nothing, the selection is still the unchunked one."""
    B, T, S, H, D, k = 2, 23, 31, 3, 8, 5
    q = torch.randn(B, T, H, D, generator=gen)
    w = torch.randn(B, T, H, generator=gen)
    keys = torch.randn(B, S, D, generator=gen)
    q_pos = torch.randint(-1, 40, (B, T), generator=gen)
    k_pos = torch.randint(-1, 40, (B, S), generator=gen)
    q_pos[1, :3] = -1  # no visible key: all -1
    ref = topk_indices_reference(indexer_scores_reference(q, w, keys, q_pos, k_pos), k)
    got = indexer_topk_chunked(q, w, keys, k, q_pos, k_pos, chunk=chunk)
    assert _as_sets(got) == _as_sets(ref)
    assert (got[1, :3] == -1).all()
    assert _as_sets(indexer_topk(q, w, keys, k, q_pos, k_pos, chunk=chunk)) == _as_sets(ref)  # the default backend
    causal = indexer_topk_chunked(q, w, keys[:, :T], k, chunk=chunk)  # default positions: prefill, sliced per chunk
    assert _as_sets(causal) == _as_sets(topk_indices_reference(indexer_scores_reference(q, w, keys[:, :T]), k))
