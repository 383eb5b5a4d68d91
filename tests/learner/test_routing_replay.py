"""Keep routing in RL: the learner's shared-prefix forward replays the sampler's MoE routing, against
plain per-sample forwards that replay the same experts; the routing metrics against hand counts."""
import random
from dataclasses import replace

import pytest
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.data.step_types import Completion, GroupSample, ScoredRound
from dsarl.learner.group_building import build_groups
from dsarl.learner.grpo_batch import pad_groups
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig, group_forward, routed_group_forward
from dsarl.learner.grpo_loss import GRPOLossConfig, grpo_loss
from dsarl.learner.logprobs import token_logprobs
from dsarl.models import ByteTokenizer, DSAConfig, build_model
from fresh_seeds import fresh_seed

E, K = 8, 2  # routed experts, experts per token
MOE_LAYERS = [1, 3]  # of 4: dense, MoE, dense, MoE


def moe_cfg(**kw) -> DSAConfig:
    base = dict(vocab_size=264, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                index_n_heads=8, index_head_dim=16, index_topk=4, n_routed_experts=E, n_group=2, topk_group=1,
                num_experts_per_tok=K, moe_intermediate_size=16, mlp_layer_types=["dense", "sparse", "dense", "sparse"],
                initializer_range=0.1)
    base.update(kw)
    return DSAConfig(**base)


def random_experts(g: torch.Generator, S: int) -> torch.Tensor:
    """[S, M, k] uint8: a random distinct top-k per (token, MoE layer), as an engine records them."""
    return torch.rand(S, len(MOE_LAYERS), E, generator=g).argsort(-1)[..., :K].to(torch.uint8)


def random_groups(seed: int, P: int, G: int) -> list[GroupSample]:
    """Groups whose completions carry random sampler routing; a group's prompt rows are shared (one prefill)."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(P):
        prompt = [rng.randrange(256) for _ in range(rng.randint(2, 9))]
        comps = [[rng.randrange(256) for _ in range(rng.randint(1, 7))] for _ in range(G)]
        prompt_rows = random_experts(g, len(prompt))
        experts = [torch.cat([prompt_rows, random_experts(g, len(c) - 1)]) for c in comps]  # [P + T - 1, M, k]
        groups.append(GroupSample(prompt, comps, [[-1.0] * len(c) for c in comps],
                                  [rng.uniform(-1, 1) for _ in range(G)], experts=experts))
    return groups


def per_layer(rows: torch.Tensor) -> list[torch.Tensor | None]:
    """[S, M, k] -> the model's per-layer routing for a batch of one ([1, S, k], None for dense layers)."""
    out = [None] * 4
    for m, layer in enumerate(MOE_LAYERS):
        out[layer] = rows[None, :, m]
    return out


def per_sample_logp(model, groups, attention, temperature, replay: bool) -> list[torch.Tensor]:
    """The plain computation: one full forward of prompt + completion per sample, replaying its recorded
    rows (the last completion token was never fed to the sampler: any experts, it reaches no log-prob)."""
    rows = []
    for grp in groups:
        for c, e in zip(grp.completions, grp.experts):
            ids = torch.tensor([grp.prompt_ids + c])
            experts = per_layer(torch.cat([e, e[-1:]])) if replay else None  # [P + T, M, k]
            logits = model(ids, attention=attention, experts=experts).logits[:, len(grp.prompt_ids) - 1: -1]
            rows.append(token_logprobs(logits, torch.tensor([c]), temperature)[0])
    return rows


def padded(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_replayed_logprobs_and_gradients_equal_per_sample_replay(attention):
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed)
    groups = random_groups(seed, P=3, G=3)
    batch = pad_groups(groups, model.config.vocab_size)
    cfg = GRPOLossConfig(beta=0.0)
    params = list(model.parameters())

    logp, _ = group_forward(model, batch, attention, 0.7, use_indices=False, keep_mask=False, use_experts=True)
    loss, _ = grpo_loss(logp, logp.detach() + 0.05 * batch.mask, batch.advantages, batch.mask, cfg=cfg)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    ref = padded(per_sample_logp(model, groups, attention, 0.7, replay=True), logp)
    assert (logp - ref).mul(batch.mask).abs().max() <= 1e-5, f"seed {seed}"
    ref_loss, _ = grpo_loss(ref, ref.detach() + 0.05 * batch.mask, batch.advantages, batch.mask, cfg=cfg)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0, name
            continue
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), f"{name} seed {seed}"
    names = [n for n, _ in model.named_parameters()]
    assert grads[names.index("model.layers.1.mlp.gate.weight")].abs().sum() > 0  # replay keeps the router's gradient

    # random routing is not the model's own: replay really is what the learner used
    with torch.no_grad():
        own, _ = group_forward(model, batch, attention, 0.7, use_indices=False, keep_mask=False, use_experts=False)
    assert (own - logp).mul(batch.mask).abs().max() > 1e-3, f"seed {seed}"


@pytest.mark.parametrize("which", ["prompt", "completion"])
def test_changed_replayed_experts_change_the_logprobs(which):
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed).requires_grad_(False)
    groups = random_groups(seed, P=2, G=2)
    base = group_forward(model, pad_groups(groups, 264), "dense", 1.0, False, False, use_experts=True)[0]
    for grp in groups:  # every id shifted by one: another expert for every (token, layer) of one part
        plen = len(grp.prompt_ids)
        part = slice(0, plen) if which == "prompt" else slice(plen, None)
        for e in grp.experts:
            e[part] = (e[part] + 1) % E
    batch = pad_groups(groups, 264)
    moved = group_forward(model, batch, "dense", 1.0, False, False, use_experts=True)[0]
    ref = padded(per_sample_logp(model, groups, "dense", 1.0, replay=True), moved)
    assert (moved - ref).mul(batch.mask).abs().max() <= 1e-5, f"seed {seed}"
    # a completion's first log-prob comes from the prompt alone; the rest see its changed tokens
    diff = (moved - base).mul(batch.mask).abs()
    assert diff.max() > 1e-3, f"seed {seed}"


def test_router_weights_do_not_change_replayed_experts():
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed).requires_grad_(False)
    groups = random_groups(seed, P=2, G=3)
    batch = pad_groups(groups, 264)
    _, _, used = routed_group_forward(model, batch, "dense", 1.0, False, False, use_experts=True)
    _, _, own = routed_group_forward(model, batch, "dense", 1.0, False, False, use_experts=False)
    with torch.no_grad():
        for layer in MOE_LAYERS:
            model.model.layers[layer].mlp.gate.weight.add_(torch.randn(E, 32) * 0.5)
    _, _, used_after = routed_group_forward(model, batch, "dense", 1.0, False, False, use_experts=True)
    _, _, own_after = routed_group_forward(model, batch, "dense", 1.0, False, False, use_experts=False)
    for part in range(2):  # prompt, completions: exact expert sets
        assert torch.equal(used[part], used_after[part])
        assert torch.equal(used[part], (batch.prompt_experts, batch.experts)[part].long())
        assert not torch.equal(own[part], own_after[part]), f"seed {seed}: the perturbation changed no choice"


def hand_counts(model, groups) -> tuple[torch.Tensor, int, int]:
    """Independent of the learner: per-sample uncached forwards, Python sets. -> (load [M, E] of the
    model's own routing, mismatched and compared (token, layer) pairs against the recorded rows), over
    each prompt once and each completion's tokens but its last."""
    load, mismatched, compared = torch.zeros(len(MOE_LAYERS), E, dtype=torch.float64), 0, 0

    def count(ids, recorded):
        nonlocal mismatched, compared
        out = model(torch.tensor([ids]), return_experts=True).experts
        for m, layer in enumerate(MOE_LAYERS):
            for s in range(len(recorded)):
                mine = out[layer][0, s].tolist()
                for e in mine:
                    load[m, e] += 1
                mismatched += set(mine) != set(recorded[s, m].tolist())
                compared += 1

    for grp in groups:
        plen = len(grp.prompt_ids)
        count(grp.prompt_ids, grp.experts[0][:plen])
        for c, e in zip(grp.completions, grp.experts):
            if len(c) > 1:  # the prompt's rows in this forward are counted once, above
                out = model(torch.tensor([grp.prompt_ids + c[:-1]]), return_experts=True).experts
                for m, layer in enumerate(MOE_LAYERS):
                    for s in range(plen, plen + len(c) - 1):
                        mine = out[layer][0, s].tolist()
                        for x in mine:
                            load[m, x] += 1
                        mismatched += set(mine) != set(e[s, m].tolist())
                        compared += 1
    return load, mismatched, compared


def own_routing_groups(model, seed: int, P: int, G: int, flip: float) -> list[GroupSample]:
    """Groups whose recorded routing is the model's own, with about a share `flip` of (token, layer) rows
    replaced by another expert set."""
    groups, g = random_groups(seed, P, G), torch.Generator().manual_seed(seed + 1)
    for grp in groups:
        plen = len(grp.prompt_ids)
        prompt_rows = None
        for i, c in enumerate(grp.completions):
            out = model(torch.tensor([grp.prompt_ids + c[:-1]]), return_experts=True).experts
            rows = torch.stack([out[layer][0] for layer in MOE_LAYERS], dim=1).to(torch.uint8)  # [P + T - 1, M, k]
            if prompt_rows is None:  # the engine prefills a prompt once for its G samples
                flip_mask = torch.rand(plen, len(MOE_LAYERS), generator=g) < flip
                prompt_rows = torch.where(flip_mask[..., None], (rows[:plen] + 3) % E, rows[:plen])
            rest = rows[plen:]
            flip_mask = torch.rand(rest.shape[:2], generator=g) < flip
            grp.experts[i] = torch.cat([prompt_rows, torch.where(flip_mask[..., None], (rest + 3) % E, rest)])
    return groups


def test_mismatch_and_load_metrics_equal_hand_counts():
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed)
    groups = own_routing_groups(model.requires_grad_(False), seed, P=3, G=2, flip=0.3)
    model.requires_grad_(True)
    with torch.no_grad():
        load, mismatched, compared = hand_counts(model, groups)
    learner = GRPOLearner(model, None, LearnerConfig(use_sampler_experts=False, micro_batch_groups=2))
    metrics = learner.update(groups)
    assert mismatched > 0
    assert metrics["moe/routing_mismatch"] == pytest.approx(mismatched / compared, abs=1e-12), f"seed {seed}"
    ratio = load.amax(1) / load.mean(1)  # [M]
    assert metrics["moe/load_max"] == pytest.approx(float(ratio.mean()), rel=1e-9)
    assert metrics["moe/load_mean"] == pytest.approx(compared / len(MOE_LAYERS) * K / E, rel=1e-9)
    for m, layer in enumerate(MOE_LAYERS):
        assert metrics[f"moe/load_max/layer_{layer}"] == pytest.approx(float(ratio[m]), rel=1e-9)


def test_replayed_load_is_the_samplers_and_no_mismatch_is_reported():
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed)
    groups = random_groups(seed, P=3, G=2)
    load = torch.zeros(len(MOE_LAYERS), E, dtype=torch.float64)
    for grp in groups:  # the sampler's rows: each prompt once, each completion's fed tokens
        plen = len(grp.prompt_ids)
        for rows in [grp.experts[0][:plen]] + [e[plen:] for e in grp.experts]:
            for m in range(len(MOE_LAYERS)):
                load[m] += torch.bincount(rows[:, m].flatten().long(), minlength=E)
    metrics = GRPOLearner(model, None, LearnerConfig(ppo_epochs=2)).update(groups)
    assert metrics["moe/load_max"] == pytest.approx(float((load.amax(1) / load.mean(1)).mean()), rel=1e-9)
    assert metrics["moe/load_mean"] == pytest.approx(float(load.mean()), rel=1e-9)  # per pass over the batch
    assert "moe/routing_mismatch" not in metrics


def test_router_bias_stays_frozen_in_an_update():
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed)
    with torch.no_grad():
        for layer in MOE_LAYERS:
            model.model.layers[layer].mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    groups = random_groups(seed, P=2, G=2)
    for grp in groups:
        grp.advantages = [1.0, -1.0]
    bias = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    router = {n: p.clone() for n, p in model.named_parameters() if n.endswith("gate.weight")}
    for use in (True, False):
        GRPOLearner(model, None, LearnerConfig(use_sampler_experts=use)).update(groups)
    assert len(bias) == len(MOE_LAYERS) == len(router)
    for n, b in model.named_buffers():
        if n in bias:
            assert torch.equal(b, bias[n]), n
    for n, p in model.named_parameters():
        if n in router:
            assert not torch.equal(p, router[n]), f"{n}: the router itself does train"


def test_engine_routing_replayed_by_the_learner_gives_the_samplers_logprobs():
    """End to end: the engine's recorded routing, through pad_groups, makes the learner's log-probs the
    sampler's; the learner's own routing may differ from the sampler's after a weight change, replay not."""
    seed = fresh_seed()
    model = build_model(moe_cfg(), seed=seed).requires_grad_(False)
    tok = ByteTokenizer()
    prompts = [tok.encode(s, add_bos=True) for s in ["abc", "routing!", "x"]]
    comps = NativeEngine(model, tok, max_batch_size=4).generate(
        prompts, SamplingParams(max_new_tokens=6, n=2, seed=seed, return_experts=True))
    groups = [GroupSample(comps[2 * p].prompt_ids, [c.token_ids for c in comps[2 * p: 2 * p + 2]],
                          [c.logprobs for c in comps[2 * p: 2 * p + 2]], [1.0, -1.0],
                          experts=[c.experts for c in comps[2 * p: 2 * p + 2]]) for p in range(3)]
    batch = pad_groups(groups, 264)
    logp = group_forward(model, batch, "dense", 1.0, False, False, use_experts=True)[0]
    assert (logp - batch.sampler_logp).mul(batch.mask).abs().max() <= 1e-4, f"seed {seed}"


def test_build_groups_passes_the_recorded_routing_through():
    g = torch.Generator().manual_seed(fresh_seed())
    rows, comps, scores = [], [], []
    for p in range(3):
        rows.append({"prompt": f"q{p}"})
        for s in range(2):
            comps.append(Completion(prompt_index=p, sample_index=s, prompt_ids=[p, p], token_ids=[s] * (s + 1),
                                    logprobs=[-0.5] * (s + 1), finish_reason="stop", text="", weight_version=0,
                                    experts=random_experts(g, 2 + s)))
            scores.append({"total": float(p == s)})
    groups, _ = build_groups([ScoredRound(rows, comps, scores)], 2, target=2, std_normalize=False,
                             filter_uniform=True)
    assert [grp.prompt_ids for grp in groups] == [[0, 0], [1, 1]]
    assert all(a is b for grp, pair in zip(groups, [comps[0:2], comps[2:4]]) for a, b in
               zip(grp.experts, [c.experts for c in pair]))
    unrecorded = [replace(c, experts=None) for c in comps]
    groups, _ = build_groups([ScoredRound(rows, unrecorded, scores)], 2, target=2, std_normalize=False,
                             filter_uniform=True)
    assert all(grp.experts is None for grp in groups)
