"""KV caches for the DSA decoder: per token and layer only the latent row [c_kv ; k_pe] and the
indexer key — nothing per head (kv_lora_rank + qk_rope_head_dim + index_head_dim numbers a token).

Two kinds share one method, `update(layer, kv_new, k_idx_new, positions)`, which stores the new
tokens and returns every key the new queries may see, with the keys' positions:
- `StaticKVCache`: preallocated buffers written in place, for generation. Each batch row holds its
  own sequence from position 0; `lengths[b]` tokens are valid. Rows may be a contiguous slice, so a
  finished slot can be refilled (prefilled) without touching the others.
  A GLM-5 "shared" layer has no indexer: it passes k_idx_new None and gets None back (its rows of
  `k_idx` stay unused).
- `PrefixKV`: differentiable concatenation, for the learner's prompt pass: a group's prompt is run
  once, and its KV recorded.
- `SharedPrefixKV` (`PrefixKV.shared_by(G)`): the learner's completion pass, G completions per prompt.
  Its `update` returns a pool of latent rows instead of per-sequence keys: every prompt's rows once,
  then every completion's own rows, and `pool_rows` turns a query's per-sequence key slots (slot s < Lp:
  the prompt's row s; Lp + j: the completion's token j) into rows of that pool. The gradients of all G
  completions add into the one prompt row.

A CPU fp32 `StaticKVCache` also keeps its indexer keys in the C top-k kernel's layout (`k_blocked`,
blocks of KEY_BLOCK slots, each block transposed), written with every key: a decode step's indexer then
scores the cache in place, where re-laying it out copied every key each step. Writes to `kv` / `k_idx`
from outside go through `write_prefix`, or call `refresh_blocked` after.
"""
import torch

from dsarl.kernels.dense_mla.cpu import visible_slots
from dsarl.kernels.topk.cpu import KEY_BLOCK

from .config import DSAConfig


class StaticKVCache:
    def __init__(self, cfg: DSAConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 blocked_keys: bool = True):
        """blocked_keys: keep the `k_blocked` mirror (CPU fp32 only); a run with dense attention, which
        never reads indexer keys, passes False and saves index_head_dim floats a token and layer."""
        L, D = cfg.num_hidden_layers, cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv = torch.zeros(L, batch_size, max_len, D, device=device, dtype=dtype)  # [L, B, S, D]
        self.k_idx = torch.zeros(L, batch_size, max_len, cfg.index_head_dim, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # valid tokens per row
        self.max_len = max_len
        self.rows = slice(0, batch_size)  # rows the next forward addresses
        self._addressing = None  # the last forward's positions and what update derives from them
        self.k_blocked = None  # [L, B, blocks, d_I, KEY_BLOCK]: k_idx in the C indexer kernel's layout
        if blocked_keys and self.k_idx.device.type == "cpu" and dtype == torch.float32:
            blocks = -(-max_len // KEY_BLOCK)
            self.k_blocked = torch.zeros(L, batch_size, blocks, cfg.index_head_dim, KEY_BLOCK, device=device)

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def select_rows(self, rows: slice) -> "StaticKVCache":
        """A view of a contiguous range of rows (sharing storage), e.g. to prefill one slot."""
        view = StaticKVCache.__new__(StaticKVCache)
        view.kv, view.k_idx = self.kv[:, rows], self.k_idx[:, rows]
        view.k_blocked = None if self.k_blocked is None else self.k_blocked[:, rows]
        view.lengths, view.max_len, view.rows = self.lengths[rows], self.max_len, slice(0, rows.stop - rows.start)
        view._addressing = None
        return view

    def next_positions(self, T: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # [B, T]

    def update(self, layer: int, kv_new: torch.Tensor, k_idx_new: torch.Tensor, positions: torch.Tensor):
        """kv_new [B, T, D], k_idx_new [B, T, d_I], positions [B, T] -> (kv [B, S, D], k_idx [B, S, d_I],
        k_pos [B, S]) with S = the largest position written + 1."""
        rows, S, k_pos, block, column = self._address(positions)
        self.kv[layer][rows, positions] = kv_new.to(self.kv.dtype)
        if k_idx_new is not None:
            self.k_idx[layer][rows, positions] = k_idx_new.to(self.k_idx.dtype)
            if self.k_blocked is not None:
                self.k_blocked[layer][rows, block, :, column] = k_idx_new.float()
        return self.kv[layer, :, :S], None if k_idx_new is None else self.k_idx[layer, :, :S], k_pos

    def _address(self, positions: torch.Tensor):
        """(rows [B, 1], S, k_pos [B, S], block, column) for positions [B, T]: block and column [B, T] are
        each position's slot in k_blocked (p // KEY_BLOCK, p % KEY_BLOCK; None without the mirror). The
        model hands every layer the same positions tensor: its first layer derives these, the others reuse
        them (the same k_pos object lets the attention kernels reuse their masks too; a decode step paid
        ~20 small ops a layer for them)."""
        last = self._addressing
        if last is not None and last[0] is positions and last[1] == positions._version:  # not changed in place
            return last[2:]
        top = int(positions.max())
        if top >= self.max_len:
            raise ValueError(f"KV cache overflow: position {top} >= max_len {self.max_len}")
        B, S = positions.shape[0], top + 1
        rows = torch.arange(B, device=positions.device)[:, None]
        blocked = self.k_blocked is not None
        self._addressing = (positions, positions._version, rows, S,
                            torch.arange(S, device=positions.device).expand(B, S),
                            positions // KEY_BLOCK if blocked else None, positions % KEY_BLOCK if blocked else None)
        return self._addressing[2:]

    def advance(self, positions: torch.Tensor) -> None:
        """After a forward: each row now holds tokens up to its last written position."""
        self.lengths.copy_(positions[:, -1] + 1)

    def blocked_keys(self, layer: int) -> torch.Tensor | None:
        """Layer's indexer keys [B, blocks, d_I, KEY_BLOCK] in the C kernel's layout (None: not kept)."""
        return None if self.k_blocked is None else self.k_blocked[layer]

    def write_prefix(self, row: int, kv: torch.Tensor, k_idx: torch.Tensor) -> None:
        """Row `row`'s first P slots of every layer: kv [L, P, D], k_idx [L, P, d_I] (a prompt's prefill)."""
        P = kv.shape[1]
        self.kv[:, row, :P] = kv
        self.k_idx[:, row, :P] = k_idx
        if self.k_blocked is not None:
            self._block(row, k_idx.float())

    def refresh_blocked(self) -> None:
        """k_blocked again from k_idx, after writing k_idx directly."""
        if self.k_blocked is not None:
            for row in range(self.batch_size):
                self._block(row, self.k_idx[:, row])

    def _block(self, row: int, k_idx: torch.Tensor) -> None:
        L, P, d = k_idx.shape
        full = P // KEY_BLOCK * KEY_BLOCK
        self.k_blocked[:, row, : P // KEY_BLOCK] = k_idx[:, :full].reshape(L, -1, KEY_BLOCK, d).transpose(2, 3)
        if full < P:
            self.k_blocked[:, row, P // KEY_BLOCK, :, : P - full] = k_idx[:, full:].transpose(1, 2)


class PrefixKV:
    """Records each layer's KV on a first (prefix) forward; later forwards attend to it (with grad)."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.lengths: torch.Tensor | None = None

    def next_positions(self, T: int) -> torch.Tensor:
        if self.lengths is None:
            return torch.arange(T)[None, :]
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def update(self, layer: int, kv_new, k_idx_new, positions):
        past = self.layers[layer]
        if past is None:
            kv, k_idx, k_pos = kv_new, k_idx_new, positions
        else:
            pkv, pidx, ppos = past
            kv = torch.cat([pkv, kv_new], dim=1)  # [B, S_past + T, D]
            k_idx = None if k_idx_new is None else torch.cat([pidx, k_idx_new], dim=1)
            k_pos = torch.cat([ppos, positions], dim=1)
        self.layers[layer] = (kv, k_idx, k_pos)
        return kv, k_idx, k_pos

    def advance(self, positions: torch.Tensor) -> None:
        self.lengths = positions[:, -1] + 1

    def blocked_keys(self, layer: int) -> None:
        return None  # the learner's keys change every forward: nothing kept in the kernel's layout

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """After a right-padded prefix forward: only the first lengths[b] tokens of row b are real;
        padded keys get position -1 so no later query sees them."""
        self.lengths = lengths
        for i, (kv, k_idx, k_pos) in enumerate(self.layers):
            self.layers[i] = (kv, k_idx, k_pos.masked_fill(k_pos >= lengths[:, None], -1))

    def shared_by(self, group_size: int) -> "SharedPrefixKV":
        """The cache of a completion pass whose rows are `group_size` completions of each prefix row, in
        row-major order (b0, b0, ..., b1, ...): one prompt, G completions."""
        return SharedPrefixKV(self, group_size)


class SharedPrefixKV:
    """G completions of each prompt attending to the prompt's keys, which are held once.

    Repeating the prompt's rows for every completion made G copies of each prompt key per layer, and the
    backward a gradient buffer per thread of that repeated size: at 8 prompts of 4k tokens and G = 8,
    82 MB copied and 165 MB zero-filled per layer and pass, a fifth of a sparse GRPO update. Here
    attention reads one pool per layer, [prompt rows of every group ; every completion's rows], through
    row numbers (`pool_rows`); the completion pass is the last, so `update` writes nothing back.
    """

    def __init__(self, prefix: PrefixKV, group_size: int):
        if prefix.lengths is None:
            raise ValueError("shared_by needs the prefix's lengths (set_lengths after the prompt pass)")
        self.prefix, self.group_size = prefix, group_size
        self.layers = prefix.layers  # read only (activation checkpointing restores a layer's entry as it was)
        self.lengths = prefix.lengths.repeat_interleave(group_size)
        self._positions = None  # (positions, its version, per-sequence k_pos [B, Lp + T])
        self._visible = None  # (positions, its version, k_pos, visible_rows)

    def next_positions(self, T: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def update(self, layer, kv_new, k_idx_new, positions):
        """kv_new [B, T, D] of the B = P * G completions -> (pool [1, P * Lp + B * T, D], indexer keys per
        sequence [B, Lp + T, d_I] or None, key positions per sequence [B, Lp + T]). The indexer keys are
        per sequence: the indexer's own selection scores them row by row (only with sparse attention)."""
        pkv, pidx, ppos = self.prefix.layers[layer]
        P, Lp, D = pkv.shape
        B, T = positions.shape
        if B != P * self.group_size:
            raise ValueError(f"{B} completion rows for {P} prompts of group size {self.group_size}")
        pool = torch.cat([pkv.reshape(P * Lp, D), kv_new.reshape(B * T, D)])[None]
        k_idx = None if k_idx_new is None else torch.cat([pidx.repeat_interleave(self.group_size, 0), k_idx_new], 1)
        return pool, k_idx, self._key_positions(ppos, positions)

    def _key_positions(self, ppos: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The same object for every layer of a forward (the prompt's key positions are the same in every
        layer), so the masks derived from it are built once."""
        last = self._positions
        if last is not None and last[0] is positions and last[1] == positions._version:
            return last[2]
        k_pos = torch.cat([ppos.repeat_interleave(self.group_size, 0), positions], 1)
        self._positions = (positions, positions._version, k_pos)
        return k_pos

    def pool_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Per-sequence key slots [B, T, K] (-1: none) -> int32 rows of `update`'s pool (-1 kept)."""
        B, T = slots.shape[:2]
        P, Lp = self.prefix.layers[0][2].shape
        b = torch.arange(B, device=slots.device)[:, None, None]
        rows = torch.where(slots < Lp, (b // self.group_size) * Lp + slots, P * Lp + b * T + (slots - Lp))
        return torch.where(slots >= 0, rows, -1).to(torch.int32)

    def visible_rows(self, positions: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Pool rows of every key each query sees [B, T, Lp + T] (-1: hidden), for dense attention; built
        by the first layer of a forward, reused by the others (same positions, same k_pos object)."""
        last = self._visible
        if last is not None and last[0] is positions and last[1] == positions._version and last[2] is k_pos:
            return last[3]
        rows = self.pool_rows(visible_slots(positions, k_pos))
        self._visible = (positions, positions._version, k_pos, rows)
        return rows

    def per_sequence(self, pool: torch.Tensor, T: int) -> torch.Tensor:
        """`update`'s pool as per-sequence rows [B, Lp + T, D], the prompt's repeated G times (a copy: for
        the attention form that up-projects every key per head)."""
        P, Lp = self.prefix.layers[0][2].shape
        flat = pool[0]
        prompt = flat[: P * Lp].view(P, Lp, -1).repeat_interleave(self.group_size, 0)
        return torch.cat([prompt, flat[P * Lp:].view(P * self.group_size, T, -1)], 1)

    def advance(self, positions: torch.Tensor) -> None:
        self.lengths = positions[:, -1] + 1

    def blocked_keys(self, layer: int) -> None:
        return None
