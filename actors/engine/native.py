"""The native generation engine on the DSA decoder's static latent KV cache (CPU and CUDA).

    prefill  prompts, right-padded, in batches of at most `prefill_tokens` tokens; one prefill per
             prompt, shared by its n samples (its latent KV rows are copied into each sample's slot)
    decode   one token per active slot per step: the model's absorbed MLA form over the cached
             [c_kv ; k_pe] rows, with the indexer's top-k selection recomputed every step (sparse)
    refill   continuous batching: a finished slot takes the next waiting sample before the next
             step (`continuous=False` waits for the whole batch to finish: the static baseline)
Inactive slots ride along at position 0 (their rows are rewritten on refill); the step runs on
rows [0, highest active slot], and refills take the lowest free slot, so a draining batch shrinks.

Sampling (temperature, top-p/k, per-sample counter-based RNG) is in sampling.py; stopping in
stopping.py. Completions come back ordered by prompt, then sample.

Partial rollouts (rollout.partial_rollouts): `stage_weights` may be called from another thread while a
generation is in flight; the generate loop swaps the staged weights in at its next step boundary and
continues. Each token records the version that sampled it (Completion.token_versions, non-decreasing);
its log-prob stays the one it was sampled with, under that version's weights, so the learner's
off-policy mask and truncated IS see the true sampling distribution of every token. At a swap the
latent KV (and indexer keys) of every sequence in flight, prompt + tokens so far, is computed again
with the new weights (one prefill, as AReaL's interrupted rollouts do), and so are prompts prefilled but
not yet placed: every token after the swap is then exactly what the new weights give for its prefix,
and its version names a real policy. Keeping the old KV would be cheaper by one prefill per update, but
a token after the swap would come from a mixture of the two weights that no version describes. Replay
records (indices, experts) of a token are those of the forward that produced or first fed it.

Replay records (SamplingParams.return_indices / return_experts): the indexer's selection of the query
that produced each token, and the MoE routing of every token fed through the model: the prompt's (from
its one prefill, shared by the n samples) and each decoded token's, stored as uint8/int16 ids. A
completion's selections leave the engine encoded (data/index_codec.py), exact and a fraction of int32.
"""
import threading
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from dsarl.models import StaticKVCache

from .sampling import SamplingParams, sample_keys, sample_step, uniforms
from .stopping import StopRule, cut_at_stop_string
from dsarl.data.index_codec import encode_indices, prefix_indices
from dsarl.data.step_types import Completion

YES_TARGETS = ("yes", "Yes", " yes", " Yes")


@dataclass
class _Prefix:
    """A prefilled prompt waiting for its samples to take slots."""

    kv: torch.Tensor  # [L, P, D] latent rows
    k_idx: torch.Tensor  # [L, P, d_I] indexer keys
    logits: torch.Tensor  # [V] next-token logits at P - 1
    indices: torch.Tensor | None  # [L, K] selection of query P - 1 (sparse)
    experts: torch.Tensor | None  # [P, M, k] routing of the prompt's tokens (MoE layers)
    unplaced: int  # samples not yet given a slot


@dataclass
class _Seq:
    """One (prompt, sample) being generated in a slot."""

    prompt_pos: int  # position in this call's prompt list
    sample_index: int
    key: np.uint64  # RNG stream key
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    keep: list[list[int]] = field(default_factory=list)
    indices: list[torch.Tensor] = field(default_factory=list)
    experts: list[torch.Tensor] = field(default_factory=list)  # [P, M, k] of the prompt, then [1, M, k] per fed token
    versions: list[int] = field(default_factory=list)  # per token, the weight version that sampled it
    finish_reason: str | None = None


def cache_dtype(model) -> torch.dtype:
    """The KV cache's dtype: the model's on a GPU (its kernels read bf16), fp32 on a CPU. dsarl's CPU kernels
    and references compute in fp32 and would widen a bf16 cache whole at every call: a bf16 model's dense
    decode at 64 x 4000 tokens ran 266 ms a token against fp32's 81, mostly in those copies. bf16 values
    are exact in fp32, so what the cache holds, and every answer read from it, is unchanged."""
    return model.lm_head.weight.dtype if model.device.type != "cpu" else torch.float32


def expert_id_dtype(n_experts: int) -> torch.dtype:
    """The smallest dtype holding expert ids 0..n_experts-1 exactly: replay records are per token and layer."""
    if n_experts <= 256:
        return torch.uint8
    if n_experts <= 32768:
        return torch.int16
    return torch.int32


def stack_moe_experts(experts: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
    """The model's per-layer routing (None for dense layers, else [B, T, k]) -> [B, T, M, k] for the M MoE
    layers, compact dtype, on the CPU."""
    return torch.stack([e for e in experts if e is not None], dim=2).to(dtype).cpu()  # [B, T, M, k]


class NativeEngine:
    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_len: int | None = None,
                 attention: str | None = None, continuous: bool = True, prefill_tokens: int = 4096,
                 weight_version: int = 0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.max_batch_size = max_batch_size
        self.max_len = max_len or self.cfg.max_position_embeddings
        self.attention = attention or self.cfg.attention
        if self.attention not in ("dense", "sparse"):
            raise ValueError(f"attention must be 'dense' or 'sparse', got {self.attention!r}")
        self.continuous = continuous
        self.prefill_tokens = prefill_tokens
        self.weight_version = weight_version
        self._vocab_text: list[str] | None = None
        # partial rollouts: weights staged by another thread, applied by the generating one
        self._cond = threading.Condition(threading.RLock())
        self._staged: tuple[dict[str, torch.Tensor], int] | None = None
        self._users = 0  # calls using the model now (generate, score): staging waits for them

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copies a full state dict into the model in place (device and dtype converted)."""
        self._check_state(state_dict)
        self._copy_state(state_dict, version)

    def _check_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        tied = {"lm_head.weight"} if self.cfg.tie_word_embeddings else set()
        missing = set(own) - set(state_dict) - tied
        unexpected = set(state_dict) - set(own)
        if missing or unexpected:
            raise ValueError(f"state_dict: missing weights {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, value in state_dict.items():
            if name not in tied and own[name].shape != value.shape:
                raise ValueError(f"state_dict[{name!r}]: shape {tuple(value.shape)} != {tuple(own[name].shape)}")

    @torch.no_grad()
    def _copy_state(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        own = self.model.state_dict()
        for name, value in state_dict.items():
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            own[name].copy_(value)
        self.weight_version = version

    def stage_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Partial rollouts: safe from another thread. Loads now when no generation runs; otherwise the
        running generation loads them at its next step boundary (a newer staging replaces an older)."""
        self._check_state(state_dict)
        with self._cond:
            if self._users:
                self._staged = (state_dict, version)
            else:
                self._staged = None
                self._copy_state(state_dict, version)
            self._cond.notify_all()

    def newest_version(self) -> int:
        """The version loaded or staged: what the next step boundary will sample with."""
        with self._cond:
            return self._staged[1] if self._staged is not None else self.weight_version

    def wait_for_version(self, version: int, timeout_s: float = 600.0) -> None:
        """Blocks until weights of at least `version` are loaded or staged (a generate submitted after
        a weight sync must not start on older weights when the sync runs on another thread)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: (self._staged[1] if self._staged else self.weight_version) >= version,
                                     timeout_s)
        if not ok:
            raise TimeoutError(f"no weights of version >= {version} arrived in {timeout_s} s "
                               f"(the engine holds version {self.weight_version})")

    def _apply_staged(self) -> bool:
        """At a step boundary: loads staged weights, if any. True when the weights changed."""
        with self._cond:  # re-entrant: also called with it held
            if self._staged is None:
                return False
            state, version = self._staged
            self._staged = None
            self._copy_state(state, version)
            return True

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 prompt_indices: list[int] | None = None,
                 step_hook: Callable[[int], None] | None = None) -> list[Completion]:
        """prompts: token ids. prompt_indices: the prompts' global indices (RNG streams and
        Completion.prompt_index; default 0..len-1), so a pool's shards sample as one engine would.
        step_hook(i), if given, runs at the i-th step boundary (before admission and decode step i;
        tests stage weights from it); staged weights are loaded right after it."""
        if prompt_indices is None:
            prompt_indices = list(range(len(prompts)))
        if len(prompt_indices) != len(prompts):
            raise ValueError(f"prompt_indices has {len(prompt_indices)} entries for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if not 0 < len(p) < self.max_len:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens; need 1..{self.max_len - 1}")
        if not prompts:
            return []
        with self._model_in_use():
            return _Run(self, prompts, params, prompt_indices).run(step_hook)

    @contextmanager
    def _model_in_use(self):
        """While a call uses the model, weights staged from another thread wait for a step boundary
        (generate) or the call's end (scoring), never change under a forward."""
        with self._cond:
            self._users += 1
            if self._users == 1:
                self._apply_staged()
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    self._apply_staged()  # staged after the last step boundary

    # ---- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, prompt_ids, completion_ids, temperature: float = 1.0):
        """Teacher scoring: log p(completion token | prefix) under the current weights.

        One prompt (list[int]) -> list[float]; a batch (list[list[int]]) -> list[list[float]].
        """
        with self._model_in_use():
            return self._score(prompt_ids, completion_ids, temperature)

    def _score(self, prompt_ids, completion_ids, temperature: float):
        single = bool(prompt_ids) and isinstance(prompt_ids[0], int)
        prompts, completions = ([prompt_ids], [completion_ids]) if single else (prompt_ids, completion_ids)
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        out = []
        for b0 in range(0, len(prompts), self.max_batch_size):
            seqs = [list(p) + list(c) for p, c in zip(prompts[b0:b0 + self.max_batch_size],
                                                      completions[b0:b0 + self.max_batch_size])]
            logits = self._full_logits(seqs)  # [B, T, V]
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # fp32 for the log-softmax
            for r, (p, c) in enumerate(zip(prompts[b0:], completions[b0:b0 + len(seqs)])):
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))
                out.append(logp[r, pos, torch.tensor(c, dtype=torch.long)].tolist())
        return out[0] if single else out

    @torch.no_grad()
    def yes_probability(self, prompts: list[str]) -> list[float]:
        """P(the text after the prompt starts with "yes"/"Yes", optionally after one space), exact over
        tokenisations: tokens that complete a target count fully, tokens that are a proper prefix of
        one are followed by another forward on the extended prefix."""
        with self._model_in_use():
            return self._yes_probability(prompts)

    def _yes_probability(self, prompts: list[str]) -> list[float]:
        vocab = self._vocab()
        frontier = [(i, self.tokenizer.encode(p, add_bos=True), 1.0, YES_TARGETS) for i, p in enumerate(prompts)]
        result = [0.0] * len(prompts)
        while frontier:
            logits = self._last_logits([ids for _, ids, _, _ in frontier])
            probs = torch.softmax(logits.float(), dim=-1).cpu()  # [N, V]
            nxt = []
            for (i, ids, weight, targets), p in zip(frontier, probs):
                for tid, text in enumerate(vocab):
                    if not text or p[tid] == 0:
                        continue
                    if any(text.startswith(t) for t in targets):
                        result[i] += weight * float(p[tid])
                        continue
                    rest = tuple(t[len(text):] for t in targets if t.startswith(text) and len(t) > len(text))
                    if rest and len(ids) + 1 < self.max_len:
                        nxt.append((i, ids + [tid], weight * float(p[tid]), rest))
            frontier = nxt
        return result

    def _vocab(self) -> list[str]:
        if self._vocab_text is None:
            # a lone UTF-8 lead byte decodes to U+FFFD: such tokens can never spell "yes"
            self._vocab_text = [self.tokenizer.decode([t]) for t in range(self.cfg.vocab_size)]
        return self._vocab_text

    def _full_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """Right-padded, no cache: causal attention keeps padding out of every real position."""
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.cfg.pad_token_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
        return self.model(ids.to(self.device), attention=self.attention).logits

    def _last_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        out = []
        for b0 in range(0, len(seqs), self.max_batch_size):
            chunk = seqs[b0:b0 + self.max_batch_size]
            logits = self._full_logits(chunk)
            last = torch.tensor([len(s) - 1 for s in chunk], device=logits.device)
            out.append(logits[torch.arange(len(chunk), device=logits.device), last])  # [B, V]
        return torch.cat(out)


class _Run:
    """The state of one generate() call: a queue of samples, slots, prefilled prompts."""

    def __init__(self, engine: NativeEngine, prompts, params: SamplingParams, prompt_indices):
        self.e, self.prompts, self.params = engine, prompts, params
        self.prompt_indices = prompt_indices
        tok = engine.tokenizer
        self.stop = StopRule.build(params, getattr(tok, "stop_ids", getattr(tok, "eos_id", None)),
                                   tuple(getattr(tok, "stop_strings", ())))
        self.want_indices = params.return_indices and engine.attention == "sparse"
        self.want_experts = params.return_experts and "sparse" in engine.cfg.layer_mlp_types
        self.expert_dtype = expert_id_dtype(engine.cfg.n_routed_experts or 1)
        B = min(engine.max_batch_size, len(prompts) * params.n)
        self.cache_len = min(engine.max_len, max(len(p) for p in prompts) + params.max_new_tokens)
        # No query of this run sees more than cache_len keys: where the top-k would select every one, a sparse
        # engine runs the dense kernels (no indexer keys or scores) and writes its selections from the counts
        self.attention = engine.cfg.attention_within(engine.attention, self.cache_len)
        self.cache = self._new_cache(B, self.cache_len, cache_dtype(engine.model))
        self.all_visible_selected = self.want_indices and self.attention != engine.attention
        self.slots: list[_Seq | None] = [None] * B
        self.last_token = torch.zeros(B, dtype=torch.long, device=engine.device)
        self.waiting = deque((i, j) for i in range(len(prompts)) for j in range(params.n))
        self.prefixes: dict[int, _Prefix] = {}
        self.done: list[_Seq] = []

    def _new_cache(self, rows: int, length: int, dtype: torch.dtype) -> StaticKVCache:
        """A cache for this run; the indexer keys' blocked mirror only where attention is sparse (read there)."""
        return StaticKVCache(self.e.cfg, rows, length, device=self.e.device, dtype=dtype,
                             blocked_keys=self.attention == "sparse")

    def run(self, step_hook: Callable[[int], None] | None = None) -> list[Completion]:
        step = 0
        while self.waiting or any(self.slots):
            if step_hook is not None:
                step_hook(step)
            if self.e._apply_staged():
                self._recompute_kv()
            step += 1
            if self.e.continuous or not any(self.slots):
                self._admit()
            if any(self.slots):
                self._decode_step()
        self.done.sort(key=lambda s: (s.prompt_pos, s.sample_index))
        return [self._completion(s) for s in self.done]

    # ---- admission: prefill and place samples into free slots ----------------------------------
    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            free = [b for b, s in enumerate(self.slots) if s is None]
            batch = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
            self._prefill(sorted({i for i, _ in batch if i not in self.prefixes}))
            self._place(list(zip(free, batch)))

    def _prefill(self, prompt_pos: list[int]) -> None:
        group: list[int] = []
        for i in prompt_pos:  # batches of at most prefill_tokens padded tokens
            longest = max([len(self.prompts[j]) for j in group + [i]])
            if group and longest * (len(group) + 1) > self.e.prefill_tokens:
                self._prefill_batch(group)
                group = []
            group.append(i)
        if group:
            self._prefill_batch(group)

    def _prefill_batch(self, prompt_pos: list[int]) -> None:
        e = self.e
        lens = [len(self.prompts[i]) for i in prompt_pos]
        P, P0 = max(lens), min(lens)
        ids = torch.full((len(prompt_pos), P), e.cfg.pad_token_id, dtype=torch.long)
        for r, i in enumerate(prompt_pos):
            ids[r, : lens[r]] = torch.tensor(self.prompts[i])
        scratch = self._new_cache(len(prompt_pos), P, self.cache.kv.dtype)
        out = e.model(ids.to(e.device), cache=scratch, attention=self.attention, return_indices=self.want_indices,
                      return_experts=self.want_experts,
                      logits_slice=slice(P0 - 1, P))  # logits only where some prompt ends
        routed = stack_moe_experts(out.experts, self.expert_dtype) if self.want_experts else None  # [B, P, M, k]
        for r, i in enumerate(prompt_pos):
            # the selections cover the logits' positions P0 - 1 .. P - 1: the prompt's last token is row lens - P0
            idx = None if out.indices is None else torch.stack([x[r, lens[r] - P0] for x in out.indices])  # [L, K]
            self.prefixes[i] = _Prefix(scratch.kv[:, r, : lens[r]], scratch.k_idx[:, r, : lens[r]],
                                       out.logits[r, lens[r] - P0], idx,
                                       None if routed is None else routed[r, : lens[r]], self.params.n)

    def _place(self, pairs: list[tuple[int, tuple[int, int]]]) -> None:
        """Copies each prompt's latent KV into its sample's slot and samples the first token."""
        seqs, logits, first_idx = [], [], []
        for b, (i, j) in pairs:
            pre = self.prefixes[i]
            P = pre.kv.shape[1]
            self.cache.write_prefix(b, pre.kv, pre.k_idx)
            self.cache.lengths[b] = P
            key = sample_keys(self.params.seed, np.array([self.prompt_indices[i]]), np.array([j]))[0]
            seqs.append(_Seq(i, j, key, experts=[] if pre.experts is None else [pre.experts]))
            logits.append(pre.logits)
            first_idx.append(pre.indices)
            pre.unplaced -= 1
            if pre.unplaced == 0:
                del self.prefixes[i]
        self._append([b for b, _ in pairs], seqs, torch.stack(logits), first_idx)

    def _recompute_kv(self) -> None:
        """After a weight swap: the latent KV and indexer keys of every sequence in flight (prompt + the
        tokens fed so far) and the prefixes not yet placed, computed again with the new weights."""
        active = [b for b, s in enumerate(self.slots) if s is not None]
        e = self.e
        for c0 in range(0, len(active), max(1, e.max_batch_size)):
            rows = active[c0:c0 + e.max_batch_size]
            seqs = [list(self.prompts[self.slots[b].prompt_pos]) + self.slots[b].tokens[:-1] for b in rows]
            lens = [len(s) for s in seqs]
            ids = torch.full((len(rows), max(lens)), e.cfg.pad_token_id, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : lens[r]] = torch.tensor(s)
            scratch = self._new_cache(len(rows), max(lens), self.cache.kv.dtype)
            e.model(ids.to(e.device), cache=scratch, attention=self.attention, logits_slice=slice(0, 0))
            for r, b in enumerate(rows):
                assert int(self.cache.lengths[b]) == lens[r], f"slot {b}: {int(self.cache.lengths[b])} != {lens[r]}"
                self.cache.write_prefix(b, scratch.kv[:, r, : lens[r]], scratch.k_idx[:, r, : lens[r]])
        unplaced = {i: pre.unplaced for i, pre in self.prefixes.items()}
        self._prefill(sorted(unplaced))
        for i, n in unplaced.items():
            self.prefixes[i].unplaced = n

    # ---- decoding ------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        active = [b for b, s in enumerate(self.slots) if s is not None]
        hi = active[-1] + 1
        view = self.cache.select_rows(slice(0, hi))
        live = torch.zeros(hi, dtype=torch.bool, device=self.cache.lengths.device)
        live[active] = True
        positions = torch.where(live, view.lengths, torch.zeros_like(view.lengths))[:, None]  # [hi, 1]
        out = self.e.model(self.last_token[:hi, None], positions=positions, cache=view, attention=self.attention,
                           return_indices=self.want_indices, return_experts=self.want_experts)
        rows = torch.tensor(active, device=out.logits.device)
        if self.want_experts:  # the routing of the token fed now: the one each slot sampled last step
            routed = stack_moe_experts(out.experts, self.expert_dtype)  # [hi, 1, M, k]
            for b in active:
                self.slots[b].experts.append(routed[b])  # [1, M, k]
        logits = out.logits[rows, -1]  # [A, V]
        step_idx = [None] * len(active)
        if out.indices is not None:
            stacked = torch.stack([x[:, -1] for x in out.indices], dim=1)  # [hi, L, K]
            step_idx = list(stacked[rows].cpu())
        self._append(active, [self.slots[b] for b in active], logits, step_idx)

    def _append(self, slots: list[int], seqs: list[_Seq], logits: torch.Tensor, step_idx: list) -> None:
        """Samples one token for each (slot, seq) from logits [A, V]; ends finished sequences."""
        p = self.params
        steps = np.array([len(s.tokens) for s in seqs])
        u = torch.from_numpy(uniforms(np.array([s.key for s in seqs], dtype=np.uint64), steps))
        out = sample_step(logits, p.temperature, p.top_k, p.top_p, u)
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        keep = None
        if p.return_keep_mask:
            keep = (out.keep if out.keep is not None else torch.ones_like(logits, dtype=torch.bool)).cpu()
        decode = self.e.tokenizer.decode
        going_on: list[int] = []  # the rows of `slots` that continue: their token is fed next step
        for a, (b, s) in enumerate(zip(slots, seqs)):
            s.tokens.append(tokens[a])
            s.logprobs.append(logprobs[a])
            s.versions.append(self.e.weight_version)
            if keep is not None:
                s.keep.append(keep[a].nonzero().squeeze(-1).tolist())
            if step_idx[a] is not None:
                s.indices.append(step_idx[a].cpu())
            room_left = len(self.prompts[s.prompt_pos]) + len(s.tokens) < self.cache_len
            s.finish_reason = self.stop.finish_reason(s.tokens, decode, room_left)
            self.slots[b] = None if s.finish_reason else s
            if s.finish_reason:
                self.done.append(s)
            else:
                going_on.append(a)
        if going_on:  # one indexed write, not one per row (64 of them were ~0.3 ms a decode step)
            self.last_token[[slots[a] for a in going_on]] = torch.tensor([tokens[a] for a in going_on],
                                                                         device=self.last_token.device)

    def _completion(self, s: _Seq) -> Completion:
        text = cut_at_stop_string(self.e.tokenizer.decode(s.tokens), self.stop.stop_strings)
        indices = None  # compact before Ray carries it
        if self.all_visible_selected:  # token t's query saw, and selected, keys 0 .. P + t - 1
            cfg = self.e.cfg
            indices = prefix_indices(len(self.prompts[s.prompt_pos]), len(s.tokens), cfg.num_hidden_layers,
                                     cfg.index_topk)
        elif s.indices:
            indices = encode_indices(torch.stack(s.indices))
        return Completion(
            prompt_index=self.prompt_indices[s.prompt_pos], sample_index=s.sample_index,
            prompt_ids=list(self.prompts[s.prompt_pos]), token_ids=s.tokens, logprobs=s.logprobs,
            finish_reason=s.finish_reason, text=text, weight_version=min(s.versions), token_versions=s.versions,
            keep_mask=s.keep if self.params.return_keep_mask else None,
            indices=indices,
            experts=torch.cat(s.experts) if s.experts else None,  # [P + T - 1, M, k]
        )
