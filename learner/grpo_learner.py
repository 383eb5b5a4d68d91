"""The GRPO learner: policy, optional frozen reference, AdamW; shared-prefix group forward.

Departures and choices (the loss maths and its departures are in grpo_loss.py):
- A group's G completions share their prompt: the prompt runs once per group (PrefixKV), the G
  completions attend to its latent KV held once (SharedPrefixKV: no per-completion copy), and their
  gradients all flow back into that one prefix. A long prompt costs one forward and one backward per
  group, not G.
- pi_old: with one optimizer step per rollout batch (ppo_epochs * mini_batches == 1) the policy *is*
  pi_old, so old_logp = logp.detach() (ratio 1, no extra forward); with more steps it is recomputed
  once before the first step. The sampler's logprobs enter through the off-policy sequence mask
  (eq. 9's pi_old is the sampler's distribution), TIS and the mismatch metrics.
- The temperature is the sampler's: the driver sets `temperature` from `rollout.temperature`.
- The learning rate follows `optim` (linear warm-up, cosine to lr * min_lr_ratio) per optimizer step
  over `total_updates * ppo_epochs * mini_batches` steps; the step count is checkpointed.
- The lightning indexer is frozen by default (as slime and prime-rl run DSA RL); `train_indexer`
  trains it by its KL on the selected set instead, with inputs detached (DSA sparse-stage rule), and
  its gradient is clipped on its own (`indexer_grad_clip`), as the sparse stage does, so the KL's
  gradient never shrinks the policy's step or the other way round.
- With `use_sampler_indices` the completion tokens attend to exactly the keys the sampler selected.
  The reference model attends with its own indexer's selection (pi_ref is the reference model's
  distribution); `reference_replays_indices` makes it reuse the sampler's selection instead (one
  indexer pass cheaper, but pi_ref is then the reference weights under the policy's selection).
- With `use_sampler_experts` (MoE) every token, prompt and completion, is routed to the experts the sampler
  chose (DeepSeek-V3.2 "keep routing"); the router still weighs them, so it keeps its gradient. The router
  bias is a buffer: frozen. The reference model routes by itself (pi_ref is its own distribution). The
  expert load and, with replay off, the share of routing that differs from the sampler's are reported
  (routing_metrics.py).
- Data parallel over ranks (a torch.distributed group, gloo on CPU, NCCL on GPU) with FSDP2
  (learner/fsdp.py): with N > 1 ranks the policy arrives sharded (fully_shard per decoder layer, then
  the root), so parameters, gradients and the AdamW state built on them are 1/N per rank. Every rank
  receives the whole rollout batch and takes groups rank, rank + world, ... of each mini-batch; the loss
  is normalised by the mini-batch's global token count (or, with `aggregation: sequence`, its non-empty
  sequence count), so FSDP's reduce-scatter, set to sum, gives exactly the one-rank gradient, and the
  grad norm (clipping, the non-finite check) and the step's loss are global, so every rank decides alike.
  FSDP's collectives run per forward and backward, so a rank with fewer micro-batches than rank 0 runs
  the missing ones on a copy of a real one with its loss times 0. Counts are summed over ranks; other
  averages are rank 0's shard. One rank keeps the plain, unsharded model. `train_indexer` needs the
  indexer's parameters outside the model's forward, so it runs on one rank only.
- `fsdp.mixed_precision: bf16` runs the forwards under bf16 autocast (matmuls in bf16); weights, gradients
  and AdamW stay fp32, and log-probabilities are taken in fp32 (logprobs.py).
- Metrics: counts (`tokens`, `sequences`, `offpolicy_masked_seqs`) are per pass over the batch;
  other values are token-weighted means, `*_max` maxima.
"""
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from dsarl.models import PrefixKV

from .fsdp import FSDPConfig, autocast_dtype, full_state_items, is_sharded
from .grpo_batch import GroupSample, PaddedGroups, pad_groups
from .grpo_loss import GRPOLossConfig, grpo_loss
from .logprobs import token_entropy, token_logprobs
from .optim import OptimConfig, build_optimizer, clip_grad, lr_at, set_lr
from .routing_metrics import RoutingCounts, routed_token_masks, routing_counts, routing_metrics

COUNT_METRICS = ("tokens", "sequences", "offpolicy_masked_seqs")  # summed, not averaged


@dataclass
class LearnerConfig:
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=0, min_lr_ratio=1.0,
                                                                    weight_decay=0.0))
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    micro_batch_groups: int = 8  # groups per forward/backward (gradient accumulation)
    # The sampling temperature (logprobs are of logits / temperature). In a GRPO run it is always
    # rollout.temperature: leave it unset (None), a different value is a config error.
    temperature: float | None = None
    attention: Literal["model", "dense", "sparse"] = "model"  # "model": the checkpoint's own setting
    use_sampler_indices: bool = True  # sparse: attend to the keys the sampler selected, when recorded
    reference_replays_indices: bool = False  # sparse: pi_ref reuses the sampler's selection (else its own)
    use_sampler_experts: bool = True  # MoE: route every token to the experts the sampler chose, when recorded
    keep_sampling_mask: bool = True  # apply the sampler's top-p/top-k keep mask to pi and pi_old
    train_indexer: bool = False  # train the indexer by its KL on the selected set (else frozen)
    indexer_kl_weight: float = 1.0
    indexer_grad_clip: float = 1.0  # max indexer grad norm with train_indexer, clipped apart from the policy's
    # A non-finite loss or gradient skips that optimizer step (counted as nonfinite_skipped); this many
    # in a row stop the run (NonFiniteError) instead of training on garbage.
    max_nonfinite_steps: int = 3
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # sharding options used with learner_ranks > 1


def group_forward(model, batch: PaddedGroups, attention: str, temperature: float, use_indices: bool,
                  keep_mask: bool, with_entropy: bool = False, use_experts: bool = False):
    """-> (logp [P*G, Lc], entropy [P*G, Lc] | None): each prompt forward once, its G completions on
    top of its (differentiable) KV."""
    return routed_group_forward(model, batch, attention, temperature, use_indices, keep_mask, with_entropy,
                                use_experts)[:2]


def _per_layer(experts: torch.Tensor | None, moe_layers: list[bool], device) -> list[torch.Tensor | None] | None:
    """[B, T, M, k] routing of the M MoE layers -> the model's per-layer list ([B, T, k], None for dense)."""
    if experts is None:
        return None
    it = iter(experts.to(device).unbind(2))
    return [next(it) if moe else None for moe in moe_layers]


def routed_group_forward(model, batch: PaddedGroups, attention: str, temperature: float, use_indices: bool,
                         keep_mask: bool, with_entropy: bool = False, use_experts: bool = False):
    """group_forward, and the routing it used: -> (logp, entropy, routing), routing = (prompt [P, Lp, M, k],
    completions [P*G, Lc, M, k]) expert ids of the M MoE layers, or None for a model without MoE.
    use_experts: route as the sampler did (batch.prompt_experts / batch.experts), when recorded."""
    P, Lp = batch.prompts.shape
    G = batch.group_size
    # no query sees more than Lp + Lc keys: with every visible key selected (the sampler's selection too)
    # sparse attention is dense attention, run without the indexer
    attention = model.config.attention_within(attention, Lp + batch.completions.shape[1])
    moe_layers = [t == "sparse" for t in model.config.layer_mlp_types]
    replay = use_experts and batch.experts is not None
    prefix = PrefixKV(model.config.num_hidden_layers)
    first = int(batch.prompt_lens.min()) - 1  # logits only from the shortest prompt's end on: the last layer
    # runs its queries and MLP there alone (the other prompt positions only give keys and values)
    prompt_out = model(batch.prompts, cache=prefix, attention=attention, return_experts=any(moe_layers),
                       experts=_per_layer(batch.prompt_experts if replay else None, moe_layers, model.device),
                       logits_slice=slice(first, Lp))
    prompt_logits = prompt_out.logits  # [P, Lp - first, V]
    last = prompt_logits[torch.arange(P, device=prompt_logits.device), batch.prompt_lens - 1 - first]  # [P, V]
    prefix.set_lengths(batch.prompt_lens)
    shared = prefix.shared_by(G)
    Lc = batch.completions.shape[1]
    # A completion's last token predicts nothing and is no earlier token's key, so the completion forward
    # feeds tokens 0..Lc-2 only (as the sampler, which never fed its last sampled token): 1/Lc less work
    fed = Lc - 1
    positions = batch.prompt_lens.repeat_interleave(G)[:, None] + torch.arange(fed, device=batch.prompt_lens.device)
    indices = batch.indices if (use_indices and attention == "sparse") else None
    indices = None if indices is None else [i[:, :fed] for i in indices]
    comp_experts = _per_layer(None if not replay else batch.experts[:, :fed], moe_layers, model.device)
    first_logits = last.repeat_interleave(G, dim=0)[:, None]  # [P*G, 1, V]: each completion's first token
    comp_out = None
    if fed > 0:
        comp_out = model(batch.completions[:, :fed], positions=positions, cache=shared, attention=attention,
                         indices=indices, return_experts=True, experts=comp_experts)
        logits = torch.cat([first_logits, comp_out.logits], dim=1)  # [P*G, Lc, V]
    else:
        logits = first_logits
    km = batch.keep_mask if keep_mask else None
    logp = token_logprobs(logits, batch.completions, temperature, km)
    entropy = token_entropy(logits.detach(), temperature, km) if with_entropy else None
    routing = None
    if any(moe_layers):
        prompt_routing = torch.stack([e for e in prompt_out.experts if e is not None], dim=2)  # [P, Lp, M, k]
        M, k = prompt_routing.shape[2:]
        # the unfed last column routes to experts 0..k-1, pad_groups' filler (routed_token_masks skips it)
        comp_routing = torch.arange(k, device=prompt_routing.device, dtype=prompt_routing.dtype).expand(
            P * G, Lc, M, k).clone()
        if comp_out is not None:
            comp_routing[:, :fed] = torch.stack([e for e in comp_out.experts if e is not None], dim=2)
        routing = (prompt_routing, comp_routing)
    return logp, entropy, routing


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class GRPOLearner:
    def __init__(self, policy, reference, cfg: LearnerConfig, total_updates: int | None = None):
        """total_updates: rollout batches the run will train on (the LR schedule's length); None keeps
        the LR at its peak after warm-up."""
        self.policy, self.reference, self.cfg = policy, reference, cfg
        if reference is not None:
            reference.eval().requires_grad_(False)
        for p in policy.indexer_parameters():
            p.requires_grad_(cfg.train_indexer)
        self.optimizer = build_optimizer(policy.parameters(), cfg.optim)
        self.version = 0
        self.optimizer_steps = 0  # drives the LR schedule; checkpointed with the trainer state
        self.nonfinite_in_row = 0  # consecutive optimizer steps skipped for a non-finite loss or gradient
        self.total_optimizer_steps = None if total_updates is None else total_updates * cfg.ppo_epochs * cfg.mini_batches
        self.temperature = 1.0 if cfg.temperature is None else cfg.temperature
        self.rank, self.world_size = 0, 1
        self.attention = policy.config.attention if cfg.attention == "model" else cfg.attention
        if cfg.loss.beta > 0 and reference is None:
            raise ValueError("learner.loss.beta > 0 needs a reference model")
        if cfg.train_indexer and is_sharded(policy):
            raise ValueError("learner.train_indexer runs on one learner rank only (the indexer's KL reads its "
                             "parameters outside the sharded model's forward); set learner_ranks: 1")
        self._autocast = autocast_dtype(cfg.fsdp.mixed_precision)
        indexer_ids = {id(p) for p in policy.indexer_parameters()}
        self._indexer_params = [p for p in policy.indexer_parameters() if p.requires_grad]
        self._policy_params = [p for p in policy.parameters() if p.requires_grad and id(p) not in indexer_ids]

    def set_data_parallel(self, rank: int, world_size: int) -> None:
        """Called once the default torch.distributed group exists."""
        self.rank, self.world_size = rank, world_size

    def current_lr(self) -> float:
        """The LR of the next optimizer step: warm-up, then cosine over the run (or flat without a length)."""
        step, optim = self.optimizer_steps, self.cfg.optim
        if self.total_optimizer_steps is None and step >= optim.warmup_steps:
            return optim.lr
        return lr_at(step, self.total_optimizer_steps or optim.warmup_steps, optim)

    def _mini_groups(self, groups: list[GroupSample]) -> list[list[GroupSample]]:
        n_mini = max(1, min(self.cfg.mini_batches, len(groups)))
        size = -(-len(groups) // n_mini)
        return [groups[i: i + size] for i in range(0, len(groups), size)]

    def _normalizer(self, groups: list[GroupSample]) -> float:
        """What the loss of a mini-batch is divided by, over all ranks: its tokens ("token"), or its
        non-empty sequences ("sequence": the paper's 1/G sum_i 1/|o_i| sum_t)."""
        if self.cfg.loss.aggregation == "sequence":
            return float(sum(1 for g in groups for c in g.completions if len(c) > 0))
        return float(sum(g.num_tokens for g in groups))

    def _split(self, groups: list[GroupSample]) -> list[tuple[float, list[PaddedGroups], int]]:
        """mini_batches parts of the groups (one optimizer step each): (global normalizer, this rank's
        micro-batches, how many of them are real). Every rank gets as many micro-batches as rank 0 (the
        sharded model's collectives run per forward/backward); the padding ones repeat the mini-batch's
        first group and are trained with weight 0."""
        V, m = self.policy.config.vocab_size, self.cfg.micro_batch_groups
        K = self.policy.config.dense_within
        device = self.policy.device
        out = []
        for mini in self._mini_groups(groups):
            local = mini[self.rank:: self.world_size]
            mbs = [pad_groups(local[j: j + m], V, dense_within=K).to(device) for j in range(0, len(local), m)]
            real = len(mbs)
            most = -(-len(mini[:: self.world_size]) // m)  # rank 0's count: it gets the most groups
            mbs += [pad_groups(mini[:1], V, dense_within=K).to(device) for _ in range(most - real)]
            out.append((self._normalizer(mini), mbs, real))
        return out

    def _logp(self, model, mb: PaddedGroups, with_entropy=False, use_indices: bool | None = None,
              use_experts: bool | None = None):
        """-> (logp, entropy, routing) of routed_group_forward."""
        use = self.cfg.use_sampler_indices if use_indices is None else use_indices
        experts = self.cfg.use_sampler_experts if use_experts is None else use_experts
        with torch.autocast(self.policy.device.type, dtype=self._autocast or torch.float32,  # the compute device
                            enabled=self._autocast is not None):
            return routed_group_forward(model, mb, self.attention, self.temperature, use,
                                        self.cfg.keep_sampling_mask, with_entropy, experts)

    def reference_logp(self, mb: PaddedGroups) -> torch.Tensor:
        """log pi_ref of the sampled tokens: the reference model with its own indexer's selection, or
        the sampler's selection with `reference_replays_indices`."""
        with torch.no_grad():
            return self._logp(self.reference, mb, use_indices=self.cfg.use_sampler_indices
                              and self.cfg.reference_replays_indices, use_experts=False)[0]

    def _indexer_kl_backward(self, groups: list[GroupSample], normalizer_groups: int) -> float:
        """train_indexer: the DSA sparse-stage indexer loss on the policy's own samples. One no-grad
        sparse forward of each prompt + completion gives every layer's selection and head-summed
        attention; the indexer (inputs detached) is trained by the KL restricted to the selection."""
        from .indexer_training import indexed_layers, sparse_layer_kl

        seqs = [g.prompt_ids + c for g in groups for c in g.completions]
        L = max(map(len, seqs))
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
        lens = torch.tensor([len(seq) for seq in seqs])
        ids, lens = ids.to(self.policy.device), lens.to(self.policy.device)
        with torch.no_grad():
            out = self.policy(ids, attention="sparse", collect_aux=True)
        pad = torch.arange(L, device=lens.device)[None] >= lens[:, None]  # [B, L] padded queries carry no loss
        kls = []
        for layer, aux in indexed_layers(self.policy, out.aux):
            aux.indices = aux.indices.masked_fill(pad[..., None], -1)
            kls.append(sparse_layer_kl(layer.self_attn, aux, self.policy.config.index_chunk))
        kl = torch.stack(kls).mean() * (len(groups) / normalizer_groups)
        (self.cfg.indexer_kl_weight * kl).backward()
        return kl.item()

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums a small CPU tensor over the ranks, on the policy's device (NCCL reduces only GPU tensors)."""
        out = t.to(self.policy.device)
        dist.all_reduce(out)
        return out.cpu()

    def _global_loss(self, local: float) -> float:
        """The step's loss summed over ranks (each carries the global normaliser)."""
        if self.world_size == 1:
            return local
        return float(self._all_reduce(torch.tensor([local], dtype=torch.float64))[0])

    def _clip_and_step(self, loss_finite: bool = True) -> tuple[float, float, bool]:
        """Clips the policy's and the indexer's gradients apart, sets the scheduled LR, steps.
        A non-finite loss or gradient norm skips the step (the weights stay as they were).
        -> (policy grad norm, indexer grad norm, stepped)."""
        policy_norm = clip_grad(self._policy_params, self.cfg.optim.grad_clip)
        indexer_norm = clip_grad(self._indexer_params, self.cfg.indexer_grad_clip) if self._indexer_params else 0.0
        if not (loss_finite and math.isfinite(policy_norm) and math.isfinite(indexer_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.max_nonfinite_steps:
                raise NonFiniteError(f"{self.nonfinite_in_row} optimizer steps in a row had a non-finite loss or "
                                     f"gradient (grad norm {policy_norm}, indexer {indexer_norm}); the weights are "
                                     f"those of the last finite step. Look at the rewards and advantages of these "
                                     f"batches (learner.max_nonfinite_steps sets the limit)")
            return policy_norm, indexer_norm, False
        self.nonfinite_in_row = 0
        set_lr(self.optimizer, self.current_lr())
        self.optimizer.step()
        self.optimizer_steps += 1
        return policy_norm, indexer_norm, True

    def update(self, groups: list[GroupSample]) -> dict[str, float]:
        """One rollout batch: ppo_epochs x mini_batches optimizer steps. Returns the batch's metrics."""
        cfg = self.cfg
        self.policy.train()
        minis = self._split(groups)
        minis_groups = self._mini_groups(groups)
        ref = [[self.reference_logp(mb) for mb in mbs] for _, mbs, _ in minis] if cfg.loss.beta > 0 else None
        with torch.no_grad():
            need_old = cfg.ppo_epochs * len(minis) > 1
            old = [[self._logp(self.policy, mb)[0] for mb in mbs] for _, mbs, _ in minis] if need_old else None
        sums: dict[str, float] = {}
        weight_total, loss_total, grad_norms, indexer_norms, lrs, skipped = 0.0, 0.0, [], [], [], 0
        routed = self._zero_routing_counts()
        for _ in range(cfg.ppo_epochs):
            for i, (normalizer, mbs, real) in enumerate(minis):
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for j, mb in enumerate(mbs):
                    if j >= real:  # padding: the collectives of a real micro-batch, a zero gradient
                        (self._logp(self.policy, mb)[0] * 0.0).sum().backward()
                        continue
                    logp, entropy, used = self._logp(self.policy, mb, with_entropy=True)
                    if routed is not None:
                        routed = routed + self._routing_counts(mb, used)
                    old_logp = old[i][j] if old is not None else logp.detach()
                    loss, metrics = grpo_loss(logp, old_logp, mb.advantages, mb.mask,
                                              ref_logp=None if ref is None else ref[i][j],
                                              sampler_logp=mb.sampler_logp, cfg=cfg.loss, normalizer=normalizer)
                    loss.backward()
                    w = float(mb.mask.sum())
                    metrics["entropy"] = float((entropy * mb.mask).sum() / max(w, 1.0))
                    step_loss += loss.item()
                    for k, v in metrics.items():
                        if k.endswith("_max"):
                            sums[k] = max(sums.get(k, float("-inf")), v)
                        elif k in COUNT_METRICS:
                            sums[k] = sums.get(k, 0.0) + v
                        elif k != "offpolicy_masked_frac":  # recomputed from the counts below
                            sums[k] = sums.get(k, 0.0) + v * w
                    weight_total += w
                if cfg.train_indexer and self.attention == "sparse":
                    local = [g for g in minis_groups[i][self.rank:: self.world_size]]
                    if local:
                        sums["indexer_kl"] = sums.get("indexer_kl", 0.0) + self._indexer_kl_backward(
                            local, len(minis_groups[i])) * float(sum(mb.mask.sum() for mb in mbs))
                step_loss = self._global_loss(step_loss)
                lrs.append(self.current_lr())
                loss_total += step_loss
                norm, indexer_norm, stepped = self._clip_and_step(math.isfinite(step_loss))
                if stepped:
                    grad_norms.append(norm)
                    indexer_norms.append(indexer_norm)
                else:
                    skipped += 1
        self.version += 1
        out = {k: (v if k.endswith("_max") or k in COUNT_METRICS else v / max(weight_total, 1.0))
               for k, v in sums.items()}
        counts = [out.get(k, 0.0) for k in COUNT_METRICS]
        if self.world_size > 1:
            counts = self._all_reduce(torch.tensor(counts, dtype=torch.float64)).tolist()
        for k, v in zip(COUNT_METRICS, counts):
            out[k] = v / cfg.ppo_epochs  # per pass over the batch
        out["offpolicy_masked_frac"] = out["offpolicy_masked_seqs"] / max(out["sequences"], 1.0)
        out["loss"] = loss_total / (cfg.ppo_epochs * len(minis))  # mean over optimizer steps of the batch loss
        out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        if self._indexer_params and indexer_norms:
            out["indexer_grad_norm"] = sum(indexer_norms) / len(indexer_norms)
        out["optimizer_steps"] = float(len(grad_norms))
        out["nonfinite_skipped"] = float(skipped)
        if routed is not None:
            out.update(self._routing_metrics(routed))
        out["lr"] = lrs[-1]
        return out

    def _moe_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.policy.config.layer_mlp_types) if t == "sparse"]

    def _zero_routing_counts(self) -> RoutingCounts | None:
        moe = self._moe_layers()
        return RoutingCounts.zeros(len(moe), self.policy.config.n_routed_experts) if moe else None

    def _routing_counts(self, mb: PaddedGroups, used) -> RoutingCounts:
        """Expert load of the routing the policy used; with replay off, compared with the sampler's."""
        compare = mb.experts is not None and not self.cfg.use_sampler_experts
        masks = routed_token_masks(mb.prompt_lens, mb.prompts.shape[1], mb.completion_lens, mb.completions.shape[1])
        return routing_counts(used, (mb.prompt_experts, mb.experts) if compare else None, masks,
                              self.policy.config.n_routed_experts)

    def _routing_metrics(self, counts: RoutingCounts) -> dict[str, float]:
        """moe/* metrics over the whole batch: counts summed over the data-parallel ranks."""
        if self.world_size > 1:
            counts = RoutingCounts.from_flat(self._all_reduce(counts.flat()), len(self._moe_layers()))
        return routing_metrics(counts, self._moe_layers(), self.cfg.ppo_epochs)

    def full_state_items(self, copy: bool = True):
        """(name, full CPU tensor) of the policy, one at a time: every rank must exhaust it (the shards are
        all-gathered in step); only rank 0 yields. See fsdp.full_state_items."""
        return full_state_items(self.policy, self.rank, copy)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full state dict (CPU) on rank 0, {} on the others; a collective with N ranks."""
        return dict(self.full_state_items())
