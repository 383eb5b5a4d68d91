"""StaticKVCache's indexer keys in the C kernel's layout (k_blocked) stay the keys it holds."""
import torch

from dsarl.kernels.topk.cpu import KEY_BLOCK
from dsarl.models import StaticKVCache
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
