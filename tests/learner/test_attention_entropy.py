"""The attention-entropy pretraining penalty against a plain per-head computation in MLA's MHA form
(keys and values up-projected from the latent: a different route to the same distributions), its
query mask, and its effect through `dsarl pretrain`: the penalty lowers the entropy it measures."""
import json

import torch

from dsarl.launch.config import load_config
from dsarl.learner.attention_entropy import attention_entropy
from dsarl.learner.pretrain import PretrainConfig, pretrain
from dsarl.models import DSAConfig, build_model, from_pretrained
from dsarl.models.rope import apply_rope_interleaved, rope_angles

T = 20


def tiny():
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    index_n_heads=2, index_head_dim=16, index_topk=4)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)  # peaked, varied heads rather than near-uniform ones
    return model


def plain_entropies(model, aux) -> torch.Tensor:
    """[layers, B, H, T] entropies from q = [q_nope, q_pe], k = [W_uk c_kv, k_pe] per head (MHA form)."""
    out = []
    for layer, a in zip(model.model.layers, aux):
        mla = layer.self_attn
        B, L, _ = a.x.shape
        cos, sin = rope_angles(a.positions, mla.rope, mla.cfg.rope_theta)
        q = mla.q_b_proj(a.c_q).view(B, L, mla.n_heads, mla.nope + mla.rope)
        q_nope, q_pe = q.split([mla.nope, mla.rope], dim=-1)
        c_kv, k_pe = mla.kv_a_proj_with_mqa(a.x).split([mla.kv_rank, mla.rope], dim=-1)
        k_nope = mla.kv_b_proj(mla.kv_a_layernorm(c_kv)).view(B, L, mla.n_heads, -1)[..., : mla.nope]
        k_pe = apply_rope_interleaved(k_pe, cos, sin)
        ents = torch.zeros(B, mla.n_heads, L)
        for b in range(B):
            for h in range(mla.n_heads):
                for t in range(L):
                    s = (q_nope[b, t, h] @ k_nope[b, : t + 1, h].T + apply_rope_interleaved(
                        q_pe[:, :, h], cos, sin)[b, t] @ k_pe[b, : t + 1].T) * mla.cfg.softmax_scale
                    p = s.softmax(-1)
                    ents[b, h, t] = -(p * p.log()).sum()
        out.append(ents)
    return torch.stack(out)


def test_entropy_matches_per_head_mha_form_and_respects_the_query_mask():
    model = tiny()
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))
    aux = model(ids, collect_aux=True).aux
    with torch.no_grad():
        plain = plain_entropies(model, aux)
    assert (plain.std(dim=(1, 3)) > 0.05).all()  # heads differ: a mean over them is a real check
    got = attention_entropy(model, aux, chunk=7)  # ragged query chunks
    assert torch.allclose(got, plain.mean(), atol=1e-5), (float(got), float(plain.mean()))
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 5:12] = True
    mask[1, 15:] = True
    expect = (plain * mask[None, :, None, :]).sum() / (mask.sum() * 3 * 2)
    assert torch.allclose(attention_entropy(model, aux, mask, chunk=4), expect, atol=1e-5)
    assert float(plain[:, :, :, 0].abs().max()) < 1e-6  # the first query sees one key: entropy 0
    # the penalty's gradient reaches the attention projections
    attention_entropy(model, aux).backward()
    assert model.model.layers[0].self_attn.q_a_proj.weight.grad.abs().sum() > 0


def test_pretrain_with_the_penalty_ends_with_lower_attention_entropy(tmp_path):
    """The same 30 steps (seed, batches) with and without the penalty: the penalised model's heads are
    more concentrated on held-out text, and its log carries the entropy it was penalised with."""
    def run(weight, name):
        cfg = load_config(PretrainConfig, "configs/pretrain_tiny.yaml",
                          [f"run_dir={tmp_path / name}", "steps=30", "log_every=1", "save_every=30",
                           "tensorboard=false", "batch_size=4", "seq_len=48", "optim.warmup_steps=3",
                           f"attention_entropy_weight={weight}"])
        model, _ = from_pretrained(pretrain(cfg, show_progress=False))
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            held_out = float(attention_entropy(model, model(ids, collect_aux=True).aux))
        return held_out, lines

    penalised, log = run(0.5, "pen")
    plain, plain_log = run(0.0, "plain")
    assert all("attention_entropy" in m for m in log) and "attention_entropy" not in plain_log[0]
    assert penalised < plain - 0.2, (penalised, plain)


def test_sampled_queries_come_from_the_mask_at_most_n_per_row_and_cover_it_evenly():
    from dsarl.learner.attention_entropy import sample_queries

    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, 10:40] = True
    mask[1, :5] = True  # fewer than n: all of them
    hits = torch.zeros(50)
    for step in range(400):
        got = sample_queries(mask, 8, torch.Generator().manual_seed(step))
        assert not (got & ~mask).any()
        assert got.sum(-1).tolist() == [8, 5, 0]
        hits += got[0].float()
    assert hits[:10].sum() == 0 and hits[40:].sum() == 0
    assert hits[10:40].min() > 0.5 * 400 * 8 / 30 and hits[10:40].max() < 1.5 * 400 * 8 / 30  # ~uniform
