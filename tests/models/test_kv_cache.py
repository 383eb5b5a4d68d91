"""StaticKVCache's indexer keys in the C kernel's layout (k_blocked) stay the keys it holds."""
import pytest
import torch

from dsarl.kernels.topk.cpu import KEY_BLOCK
from dsarl.models import PrefixKV, StaticKVCache
from small_model import small_cfg


def unblocked(cache: StaticKVCache) -> torch.Tensor:
    """k_blocked [L, B, blocks, d, KB] read back as [L, B, blocks * KB, d]."""
    L, B, nb, d, kb = cache.k_blocked.shape
    return cache.k_blocked.transpose(3, 4).reshape(L, B, nb * kb, d)


def assert_mirrors(cache: StaticKVCache, lengths: list[int]) -> None:
    back = unblocked(cache)
    for b, n in enumerate(lengths):
        assert torch.equal(back[:, b, :n], cache.k_idx[:, b, :n]), f"row {b}"


def test_every_write_reaches_the_blocked_mirror():
    cfg = small_cfg(num_hidden_layers=2)
    gen = torch.Generator().manual_seed(0)
    B, d, D = 3, cfg.index_head_dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = StaticKVCache(cfg, B, max_len=2 * KEY_BLOCK + 9)
    assert cache.k_blocked.shape == (2, B, 3, d, KEY_BLOCK)
    T = KEY_BLOCK + 5  # a prefill across a block boundary
    positions = torch.arange(T)[None].expand(B, T)
    for layer in range(2):
        kv, k_idx, k_pos = cache.update(layer, torch.randn(B, T, D, generator=gen), torch.randn(B, T, d, generator=gen),
                                        positions)
        assert torch.equal(cache.blocked_keys(layer), cache.k_blocked[layer])
    cache.advance(positions)
    assert_mirrors(cache, [T] * B)
    for step in range(KEY_BLOCK):  # decode steps through a view of rows 1..2, as the engine's batch
        view = cache.select_rows(slice(1, 3))
        pos = view.lengths[:, None].clone()
        for layer in range(2):
            view.update(layer, torch.randn(2, 1, D, generator=gen), torch.randn(2, 1, d, generator=gen), pos)
        view.advance(pos)
    assert_mirrors(cache, [T, T + KEY_BLOCK, T + KEY_BLOCK])
    P = KEY_BLOCK + 3  # a prompt's prefix copied into row 0 (the engine placing a sample)
    cache.write_prefix(0, torch.randn(2, P, D, generator=gen), torch.randn(2, P, d, generator=gen))
    assert_mirrors(cache, [P, T + KEY_BLOCK, T + KEY_BLOCK])
    cache.k_idx.copy_(torch.randn(cache.k_idx.shape, generator=gen))  # written directly, then refreshed
    cache.refresh_blocked()
    assert_mirrors(cache, [cache.max_len] * B)


def test_a_cache_of_another_dtype_keeps_no_mirror():
    cache = StaticKVCache(small_cfg(), 2, 16, dtype=torch.bfloat16)
    assert cache.k_blocked is None and cache.blocked_keys(0) is None


def test_layers_share_one_addressing_until_the_positions_change():
    """update derives rows, S and k_pos once per positions tensor (every layer of a forward passes the same
    one) and again for another tensor or after the same one was changed in place."""
    cfg = small_cfg(num_hidden_layers=2)
    gen = torch.Generator().manual_seed(0)
    B, d, D = 2, cfg.index_head_dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = StaticKVCache(cfg, B, max_len=16)
    pos = torch.tensor([[3], [5]])
    rows = [torch.randn(B, 1, D, generator=gen) for _ in range(3)]
    _, _, k_pos0 = cache.update(0, rows[0], torch.randn(B, 1, d, generator=gen), pos)
    kv1, _, k_pos1 = cache.update(1, rows[1], torch.randn(B, 1, d, generator=gen), pos)
    assert k_pos1 is k_pos0 and torch.equal(k_pos0, torch.arange(6).expand(B, 6)) and kv1.shape[1] == 6
    pos.add_(4)  # in place: positions 7 and 9 now
    kv1, _, k_pos = cache.update(1, rows[2], torch.randn(B, 1, d, generator=gen), pos)
    assert kv1.shape[1] == 10 and torch.equal(k_pos, torch.arange(10).expand(B, 10))
    assert torch.equal(cache.kv[1, 0, 7], rows[2][0, 0]) and torch.equal(cache.kv[1, 1, 9], rows[2][1, 0])
    assert torch.equal(cache.kv[1, 0, 3], rows[1][0, 0]) and torch.equal(cache.kv[0, 1, 5], rows[0][1, 0])
    fresh = torch.tensor([[1], [15]])
    assert cache.update(0, rows[0], None, fresh)[0].shape[1] == 16
    with pytest.raises(ValueError, match="overflow"):  # position 16 of a 16-slot cache
        cache.update(0, rows[0], None, fresh + 1)


def test_shared_prefix_pool_rows_address_the_per_sequence_keys():
    """A completion's key slot s (s < Lp: its prompt's row s; Lp + j: its own token j) read through
    pool_rows is the row the per-sequence layout (the prompt repeated G times) has at s, for every slot."""
    P, G, Lp, T, D = 3, 4, 5, 6, 7
    prefix = PrefixKV(1)
    prompt_kv = torch.randn(P, Lp, D)
    prefix.update(0, prompt_kv, None, torch.arange(Lp).expand(P, Lp))
    prefix.set_lengths(torch.tensor([5, 2, 4]))
    shared = prefix.shared_by(G)
    own = torch.randn(P * G, T, D)
    positions = shared.next_positions(T)
    pool, k_idx, k_pos = shared.update(0, own, None, positions)
    assert pool.shape == (1, P * Lp + P * G * T, D) and k_idx is None
    per_seq = torch.cat([prompt_kv.repeat_interleave(G, 0), own], 1)  # [P*G, Lp + T, D]
    torch.testing.assert_close(shared.per_sequence(pool, T), per_seq, atol=0, rtol=0)
    assert torch.equal(k_pos[:, Lp:], positions) and torch.equal(k_pos[:, :Lp], prefix.layers[0][2].repeat_interleave(G, 0))
    slots = torch.randint(-1, Lp + T, (P * G, T, 9))
    rows = shared.pool_rows(slots)
    assert rows.dtype == torch.int32 and torch.equal(rows < 0, slots < 0)
    want = per_seq[torch.arange(P * G)[:, None, None], slots.clamp(min=0)]
    torch.testing.assert_close(pool[0][rows.clamp(min=0).long()][slots >= 0], want[slots >= 0], atol=0, rtol=0)
    # dense attention's rows: every visible key (the prompt's real tokens, the completion's up to the query)
    visible = shared.visible_rows(positions, k_pos)
    assert visible is shared.visible_rows(positions, k_pos)  # built once per forward
    for b in range(P * G):
        plen = int(prefix.lengths[b // G])
        for t in range(T):
            seen = visible[b, t][visible[b, t] >= 0].tolist()
            assert seen == [b // G * Lp + s for s in range(plen)] + [P * Lp + b * T + j for j in range(t + 1)]
