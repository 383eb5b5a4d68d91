"""The DSA decoder against plain references: sparse = dense at k >= L, incremental decoding = full
forward, indexer = naive loop, causality, checkpoints, config errors."""
import json

import pytest
import torch

from dsarl import kernels
from dsarl.models import DSAConfig, StaticKVCache, build_model, from_pretrained, save_pretrained
from dsarl.models.config import ConfigError
from dsarl.models.rope import rope_angles
from fresh_seeds import fresh_seed
from small_model import small_cfg


@pytest.mark.parametrize("fp8, dense_when_all_fit", [(False, False), (True, False), (False, True)])
def test_sparse_equals_dense_when_topk_covers_sequence(fp8, dense_when_all_fit):
    # dense_when_all_fit=False forces the indexer + sparse kernel path even though k covers every key
    seed = fresh_seed()
    L = 23
    model = build_model(small_cfg(index_topk=L, index_fp8=fp8, index_dense_when_all_fit=dense_when_all_fit),
                        seed=seed)
    ids = torch.randint(0, 264, (2, L), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        dense = model(ids, attention="dense").logits
        sparse = model(ids, attention="sparse").logits
    assert (dense - sparse).abs().max().item() <= 1e-5, f"seed {seed}"


def test_sparse_differs_from_dense_when_topk_is_small():
    # guards the previous test against a sparse path that silently runs dense attention
    model = build_model(small_cfg(index_topk=3), seed=0)
    ids = torch.randint(0, 264, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids, attention="dense").logits - model(ids, attention="sparse").logits).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_incremental_decoding_matches_full_forward(attention):
    seed = fresh_seed()
    cfg = small_cfg(index_topk=4)
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompt_lens, total = [3, 9, 6], 15
    seqs = torch.randint(0, 264, (3, total), generator=g)
    cache = StaticKVCache(cfg, batch_size=3, max_len=32)
    padded = torch.full((3, max(prompt_lens)), 256)
    for b, n in enumerate(prompt_lens):
        padded[b, :n] = seqs[b, :n]
    with torch.no_grad():
        prefill = model(padded, cache=cache, attention=attention).logits
        cache.lengths.copy_(torch.tensor(prompt_lens))
        full = model(seqs, attention=attention).logits  # [3, total, V], no cache
        for b, n in enumerate(prompt_lens):
            assert (prefill[b, n - 1] - full[b, n - 1]).abs().max() <= 1e-4
        cur = torch.tensor(prompt_lens)
        while int(cur.max()) < total:
            step_ids = seqs[torch.arange(3), cur.clamp(max=total - 1)][:, None]  # one token per row
            logits = model(step_ids, cache=cache, attention=attention).logits[:, 0]
            for b in range(3):
                if cur[b] < total:
                    assert (logits[b] - full[b, cur[b]]).abs().max() <= 1e-4, f"seed {seed} row {b} pos {cur[b]}"
            cur += 1


def test_dense_attention_runs_no_indexer_unless_the_warm_up_asks(monkeypatch):
    """Dense forwards (a dense rollout's prefill and decode, a dense learner) never need indexer keys and
    skip them, with the same logits; the warm-up's aux and a sparse forward still compute them."""
    seed = fresh_seed()
    cfg = small_cfg(index_topk=4)
    model = build_model(cfg, seed=seed)
    ids = torch.randint(0, 264, (2, 12), generator=torch.Generator().manual_seed(seed))
    indexer_type = type(model.model.layers[0].self_attn.indexer)
    calls = []
    orig = indexer_type.keys
    monkeypatch.setattr(indexer_type, "keys", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    with torch.no_grad():
        want = model(ids, attention="dense").logits
        cache = StaticKVCache(cfg, 2, 16)
        first = model(ids[:, :8], cache=cache, attention="dense").logits
        rest = model(ids[:, 8:], cache=cache, attention="dense").logits
        assert calls == []
        assert torch.allclose(torch.cat([first, rest], 1), want, atol=1e-5)
        aux = model(ids, attention="dense", collect_aux=True)
        assert len(calls) == cfg.num_hidden_layers and torch.equal(aux.logits, want)
        model(ids, attention="sparse")
        assert len(calls) == 2 * cfg.num_hidden_layers


def test_indexer_scores_match_naive_loop():
    seed = fresh_seed()
    cfg = small_cfg()
    model = build_model(cfg, seed=seed)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 9
    x = torch.randn(B, T, cfg.hidden_size, generator=g)
    positions = torch.arange(T)[None].expand(B, T)
    cos, sin = rope_angles(positions, cfg.qk_rope_head_dim, cfg.rope_theta)
    c_q = attn.q_a_layernorm(attn.q_a_proj(x))
    with torch.no_grad():
        q, w = attn.indexer.queries(c_q, x, cos, sin)
        k = attn.indexer.keys(x, cos, sin)
        scores = kernels.indexer_scores(q, w, k)
    H = cfg.index_n_heads
    for b in range(B):
        for t in range(T):
            for s in range(T):
                if s > t:
                    assert scores[b, t, s] == float("-inf")
                    continue
                expect = sum(float(w[b, t, j]) * max(0.0, float(q[b, t, j] @ k[b, s])) for j in range(H))
                assert abs(float(scores[b, t, s]) - expect) <= 1e-5 * max(1.0, abs(expect))


def test_indexer_weight_formula():
    # w = W_w x / sqrt(H_I d_I), as in DeepSeek-V3.2 (weights_proj * H^-0.5 * softmax_scale d^-0.5)
    cfg = small_cfg()
    idx = build_model(cfg, seed=1).model.layers[0].self_attn.indexer
    x = torch.randn(1, 4, cfg.hidden_size)
    cos, sin = rope_angles(torch.arange(4)[None], cfg.qk_rope_head_dim, cfg.rope_theta)
    _, w = idx.queries(torch.randn(1, 4, cfg.q_lora_rank), x, cos, sin)
    expect = x @ idx.weights_proj.weight.T / (cfg.index_n_heads * cfg.index_head_dim) ** 0.5
    torch.testing.assert_close(w, expect)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_no_future_selection_and_causality(attention):
    seed = fresh_seed()
    cfg = small_cfg(index_topk=4)
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 264, (2, 20), generator=g)
    with torch.no_grad():
        out = model(ids, attention=attention, return_indices=True)
        changed = ids.clone()
        changed[:, 12:] = torch.randint(0, 264, (2, 8), generator=g)
        out2 = model(changed, attention=attention)
    assert torch.equal(out.logits[:, :12], out2.logits[:, :12])
    if attention == "sparse":
        for layer_idx in out.indices:
            t = torch.arange(20)[None, :, None]
            valid = layer_idx >= 0
            assert bool((layer_idx[valid] <= t.expand_as(layer_idx)[valid]).all())
            # every query has min(t+1, k) selected keys, without duplicates
            for tt in range(20):
                row = layer_idx[0, tt][layer_idx[0, tt] >= 0].tolist()
                assert len(row) == min(tt + 1, cfg.index_topk) and len(set(row)) == len(row)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    for tied in (True, False):
        model = build_model(small_cfg(tie_word_embeddings=tied), seed=fresh_seed())
        save_pretrained(model, tmp_path / f"ck{tied}")
        loaded, tok = from_pretrained(tmp_path / f"ck{tied}")
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
        cfg = json.loads((tmp_path / f"ck{tied}" / "config.json").read_text())
        assert cfg["model_type"] == "deepseek_v32" and cfg["kv_lora_rank"] == 24


def test_new_indexer_keeps_the_dense_model_and_reshapes_only_the_indexer(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = small_cfg()
    model = build_model(cfg, seed=fresh_seed())
    save_pretrained(model, tmp_path / "ck")
    heads = cfg.index_n_heads * 2
    with pytest.raises(RuntimeError, match="size mismatch"):  # without new_indexer a new shape cannot load
        from_pretrained(tmp_path / "ck", index_n_heads=heads)
    a, _ = from_pretrained(tmp_path / "ck", new_indexer=True, seed=3, index_n_heads=heads)
    b, _ = from_pretrained(tmp_path / "ck", new_indexer=True, seed=3, index_n_heads=heads)
    old, new = model.state_dict(), a.state_dict()
    for name, value in new.items():
        if ".indexer." in name:
            assert torch.equal(value, b.state_dict()[name])  # seeded: the same fresh indexer twice
            if name.endswith("weights_proj.weight"):
                assert value.shape[0] == heads
        else:
            assert torch.equal(value, old[name])  # every main-model weight is the checkpoint's, bit for bit
    assert a.config.index_n_heads == heads
    # a dense checkpoint with no indexer at all (DeepSeek-V3.1's case) loads the same way
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".indexer." not in k}, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing weights"):
        from_pretrained(tmp_path / "ck")
    c, _ = from_pretrained(tmp_path / "ck", new_indexer=True, seed=3, index_n_heads=heads)
    assert all(torch.equal(v, new[k]) for k, v in c.state_dict().items())


def test_checkpoint_weight_names_follow_hf_layout(tmp_path):
    from safetensors import safe_open

    save_pretrained(build_model(small_cfg(), seed=0), tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.self_attn.indexer.k_norm.bias",
                 "model.layers.0.self_attn.indexer.weights_proj.weight", "model.layers.0.mlp.gate_proj.weight"]:
        assert name in names


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    model = build_model(small_cfg(), seed=0)
    save_pretrained(model, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_pretrained(build_model(small_cfg(), seed=1), tmp_path / "ck", extra_files={"x": boom})
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.parametrize(
    "change, key",
    [({"hidden_sise": 64}, "hidden_sise"), ({"kv_lora_rank": 0}, "kv_lora_rank"), ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
     ({"index_head_dim": 4}, "index_head_dim"), ({"attention": "sparse-ish"}, "attention"),
     ({"scoring_func": "softmax"}, "scoring_func"), ({"n_routed_experts": 6, "n_group": 4}, "n_group"),
     ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
     ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters"),
     ({"indexer_types": ["shared", "full"]}, "indexer_types"), ({"model_type": "llama"}, "model_type")],
)
def test_bad_model_config_names_key_and_file(tmp_path, change, key):
    d = small_cfg().to_dict()
    d.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        DSAConfig.from_file(path)
    assert key in str(e.value) and str(path) in str(e.value)


def test_fp8_quant_dequant_error_bound():
    x = torch.randn(64, 32) * torch.logspace(-2, 2, 64)[:, None]
    y = kernels.fp8_quant_dequant(x)
    scale = x.abs().amax(-1, keepdim=True) / 448
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; absolute 2^-10 * scale near zero
    assert bool(((x - y).abs() <= x.abs() / 16 + scale * 2**-9 + 1e-12).all())
    assert not torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_mlp_equal_their_plain_maths(dtype, monkeypatch):
    """RMSNorm and SwiGLU (with autograd and in its no-grad in-place form) against the formulas written
    out: x * rsqrt(mean(x^2) + eps) * w in fp32, rounded once; down(silu(gate(x)) * up(x)). Through the
    reference ops (DSARL_KERNELS=reference) bit for bit; through the CPU C kernels within fp32 rounding
    (they sum and exponentiate in another order), the no-grad form still bit for bit the autograd form."""
    from dsarl.models.layers import RMSNorm, SwiGLU

    g = torch.Generator().manual_seed(fresh_seed())
    for backend in ("reference", "default"):
        if backend == "reference":
            monkeypatch.setenv("DSARL_KERNELS", "reference")
        else:
            monkeypatch.delenv("DSARL_KERNELS", raising=False)
        for width in (8, 80, 256, 1000):
            norm = RMSNorm(width, eps=1e-5).to(dtype)
            norm.weight.data = (torch.randn(width, generator=g) * 0.3 + 1).to(dtype)
            x = (torch.randn(3, 5, width, generator=g) * 4).to(dtype)
            xf = x.float()
            want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).to(dtype)
            mlp = SwiGLU(width, 2 * width).to(dtype)
            plain = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            with torch.no_grad():
                fast = mlp(x)
            trained = mlp(x)
            assert trained.requires_grad and torch.equal(fast, trained)
            if backend == "reference":
                assert torch.equal(norm(x), want) and torch.equal(trained, plain)
                continue
            # one rounding of the output's dtype, and in bf16 the plain form's own two roundings of silu * up
            tol = 2e-6 if dtype == torch.float32 else 2**-6
            for got, ref in ((norm(x), want), (trained, plain)):
                err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
                assert err < tol, (width, float(err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_feature_major_inference_form_equals_the_autograd_form(dtype, monkeypatch):
    """Without autograd, SwiGLU runs batches of FEATURE_MAJOR_ROWS rows (a decode step) as W @ x^T: the same
    maths within the GEMMs' summation order, on 2-D and 3-D inputs at both ends of the window, and outside
    the window (or with autograd) the row-major form itself, bit for bit."""
    from dsarl.models.layers import FEATURE_MAJOR_ROWS, SwiGLU

    lo, hi = FEATURE_MAJOR_ROWS
    g = torch.Generator().manual_seed(fresh_seed())
    mlp = SwiGLU(96, 224).to(dtype)
    calls = []
    feature_major = SwiGLU._forward_feature_major
    monkeypatch.setattr(SwiGLU, "_forward_feature_major", lambda self, x, rows: calls.append(rows) or
                        feature_major(self, x, rows))
    tol = 2e-6 if dtype == torch.float32 else 2**-6
    for shape in ((lo, 96), (hi // 2, 2, 96), (hi, 1, 96), (lo - 1, 96), (hi + 1, 1, 96)):
        x = (torch.randn(*shape, generator=g) * 2).to(dtype)
        trained = mlp(x)
        with torch.no_grad():
            fast = mlp(x)
        assert fast.shape == x.shape and trained.requires_grad
        rows = x.numel() // 96
        if lo <= rows <= hi:
            assert calls[-1] == rows
            err = (fast.float() - trained.float()).abs().max() / trained.float().abs().max()
            assert err < tol, (shape, float(err))
        else:
            assert torch.equal(fast, trained.detach())
    assert calls == [lo, hi, hi]  # the rows outside the window went the row-major way


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interleaved_rope_is_the_pair_rotation_written_out(dtype):
    """apply_rope_interleaved (a complex multiply) against (a cos - b sin, a sin + b cos) per pair in fp64,
    forward and backward, within one rounding of the output's dtype: on a contiguous tensor, on strided
    views of a wider one at even and odd offsets (q's and k's rope parts are such views), and with cos/sin
    broadcast over heads. A swapped sign or a pair read as (x[i], x[i + d/2]) is off by O(1)."""
    from dsarl.models.rope import apply_rope_interleaved

    g = torch.Generator().manual_seed(fresh_seed())
    B, T, H, d = 3, 5, 4, 8
    ang = torch.randn(B, T, d // 2, generator=g) * 3
    cos, sin = ang.cos(), ang.sin()

    def written_out(x):  # in fp64
        xf = x.double()
        a, b = xf[..., 0::2], xf[..., 1::2]
        c, s = (cos.double(), sin.double()) if x.dim() == 3 else (cos[:, :, None].double(), sin[:, :, None].double())
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)

    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7  # relative rounding of the output's dtype, times 2

    wide = torch.randn(B, T, H, 3 + d + 4, generator=g).to(dtype)
    for x in (torch.randn(B, T, H, d, generator=g).to(dtype), wide[..., 3:3 + d], wide[..., 4:4 + d],
              torch.randn(B, T, d, generator=g).to(dtype), wide[:, :, 1, 3:3 + d]):
        x = x.detach().requires_grad_()
        got = apply_rope_interleaved(x, cos, sin)
        want = written_out(x)
        assert got.dtype == dtype and ((got.double() - want).abs() <= 2 * ulp * x.detach().double().abs().max()).all()
        dy = torch.randn(got.shape, generator=g).to(dtype)
        dx = torch.autograd.grad(got, x, dy)[0]
        dx_want = torch.autograd.grad(want, x, dy.double())[0]
        assert ((dx.double() - dx_want).abs() <= 2 * ulp * dy.double().abs().max()).all()
