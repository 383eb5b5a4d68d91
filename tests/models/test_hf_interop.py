"""dsarl against transformers itself (DESIGN.md section 2), on fresh random tiny checkpoints in fp32.

In: transformers builds DeepseekV32 / GlmMoeDsa / DeepseekV3 models (MoE and dense MLP layers, YaRN on and
off), randomises every weight (the default init has a zero router bias and unit norms, which would hide
mistakes), saves them with save_pretrained (sharded), and dsarl's logits must equal transformers' eager
forward to 1e-4 relative.
- transformers has no dense mode: its indexer always selects min(index_topk, keys) keys. So "dense" is
  compared as dsarl attention="dense" against transformers with index_topk >= the sequence length (its
  selection is then every visible key), and "sparse" at index_topk=5 < 24 tokens, where selection
  matters: the selected index sets must be identical (transformers' top-k rows for t < k also hold masked
  future keys, which its mask drops again; those are compared as the visible part) and so must the logits.
- Cached decoding (StaticKVCache, as the native engine drives it) equals dsarl's full forward.
Out: what dsarl saves (its toy models too) loads with AutoConfig / AutoModelForCausalLM / AutoTokenizer
unchanged, and transformers' logits equal dsarl's.
"""
import itertools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config,  # noqa: E402
                          DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig,
                          GlmMoeDsaForCausalLM)

from dsarl.models import ByteTokenizer, DSAConfig, StaticKVCache, build_model, from_pretrained, save_pretrained  # noqa: E402
from dsarl.models.config import ConfigError  # noqa: E402

T, SPARSE_K, DENSE_K = 24, 5, 64
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
        "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}  # mscale != all_dim: both corrections
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}
HF_CLASSES = {"deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
              "glm_moe_dsa": (GlmMoeDsaConfig, GlmMoeDsaForCausalLM),
              "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}


def hf_kwargs(model_type: str, rope: dict, index_topk: int) -> dict:
    d = dict(vocab_size=101, hidden_size=48, intermediate_size=72, moe_intermediate_size=20, num_hidden_layers=4,
             num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=8, n_group=4,
             topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
             qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8, first_k_dense_replace=1,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
             rope_parameters=dict(rope))
    if model_type != "deepseek_v3":
        # 8 index heads: a key scores exactly 0 when every ReLU term is 0 (odds 2^-H), and a query whose head
        # weights are all negative ranks such keys first; two of them at the top-k boundary would be a tie that
        # either side may break its own way. With 4 heads that happened in these tiny models, with 8 it is rare.
        d.update(index_topk=index_topk, index_head_dim=16, index_n_heads=8)
    if model_type == "glm_moe_dsa":
        d.update(indexer_types=["full", "shared", "full", "shared"], rms_norm_eps=1e-5)
    return d


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every weight and persistent buffer random: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + 0.1 N, biases
    (including the router's e_score_correction_bias) ~ 0.1 N, so a wrong scale, layout or choice shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if t.dim() == 1:
                t.copy_((0.0 if name.endswith("bias") else 1.0) + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)


def hf_checkpoint(path, model_type: str, rope: dict, index_topk: int, seed: int, dtype=torch.float32):
    """A random transformers model saved as a user downloads it (sharded) -> its eager reload from disk."""
    cfg_cls, model_cls = HF_CLASSES[model_type]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**hf_kwargs(model_type, rope, index_topk)))
    randomize_(model, seed)
    model.to(dtype).save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    return load_hf(path)


def load_hf(path, **overrides):
    # eager experts too: transformers' grouped-mm experts need 16-byte strides, which bf16 tiny widths lack on CPU
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", experts_implementation="eager",
                                                **overrides).eval()


def ids_for(seed: int, vocab: int = 101, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


def hf_forward(model, ids) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """-> (logits [B, T, V], {layer: top-k indices [B, T, k]} of every layer that runs an indexer)."""
    picked, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith("self_attn.indexer") and module is not None:
            layer = int(name.split(".")[2])
            hooks.append(module.register_forward_hook(lambda m, a, out, layer=layer: picked.__setitem__(layer, out)))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, picked


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    assert err <= tol, f"max relative error {err:.2e} > {tol:.0e}"


def assert_same_selection(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """ours [B, T, K] (-1 padded), theirs [B, T, k']: per query, the same set of visible keys."""
    B, Tq, _ = ours.shape
    for b, t in itertools.product(range(B), range(Tq)):
        mine = {int(s) for s in ours[b, t] if s >= 0}
        hf = {int(s) for s in theirs[b, t] if s <= t}
        assert mine == hf, f"row {b} query {t}: dsarl {sorted(mine)} != transformers {sorted(hf)}"


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("rope", [PLAIN, YARN], ids=["plain", "yarn"])
@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_transformers_checkpoint_gives_transformers_logits(tmp_path, model_type, rope, attention):
    k = SPARSE_K if attention == "sparse" else DENSE_K
    hf = hf_checkpoint(tmp_path, model_type, rope, k, seed=11)
    ours, _ = from_pretrained(tmp_path)
    assert ours.config.model_type == model_type and ours.config.layer_mlp_types == ["dense", "sparse", "sparse", "sparse"]
    ids = ids_for(5)
    hf_logits, hf_picked = hf_forward(hf, ids)
    with torch.no_grad():
        out = ours(ids, attention=attention, return_indices=True)
    assert_rel(out.logits, hf_logits)
    if attention == "sparse":
        full = [i for i, kind in enumerate(ours.config.layer_indexer_types) if kind == "full"]
        assert sorted(hf_picked) == full
        for layer, idx in enumerate(out.indices):
            source = max(i for i in full if i <= layer)  # a shared layer attends with its full layer's keys
            assert_same_selection(idx, hf_picked[source])
        # guards against a sparse path that silently runs dense: the selection changes the logits here
        with torch.no_grad():
            assert (ours(ids, attention="dense").logits - out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_cached_decoding_equals_full_forward(tmp_path, model_type, attention):
    hf_checkpoint(tmp_path, model_type, YARN, SPARSE_K, seed=12)
    model, _ = from_pretrained(tmp_path)
    seqs = ids_for(6, batch=3)
    prompt_lens = [3, 9, 7]
    cache = StaticKVCache(model.config, batch_size=3, max_len=32)
    padded = torch.zeros(3, max(prompt_lens), dtype=torch.long)
    for b, n in enumerate(prompt_lens):
        padded[b, :n] = seqs[b, :n]
    with torch.no_grad():
        full = model(seqs, attention=attention).logits  # [3, T, V]
        prefill = model(padded, cache=cache, attention=attention).logits
        cache.lengths.copy_(torch.tensor(prompt_lens))
        for b, n in enumerate(prompt_lens):
            assert_rel(prefill[b, n - 1], full[b, n - 1])
        cur = torch.tensor(prompt_lens)
        while int(cur.min()) < T:
            step = seqs[torch.arange(3), cur.clamp(max=T - 1)][:, None]  # one token per row
            logits = model(step, cache=cache, attention=attention).logits[:, 0]
            for b in range(3):
                if cur[b] < T:
                    assert_rel(logits[b], full[b, cur[b]])
            cur += 1


def dsarl_model(kind: str) -> "torch.nn.Module":
    base = dict(vocab_size=264, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=3,
                q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                index_n_heads=8, index_head_dim=16, index_topk=SPARSE_K)
    moe = dict(n_routed_experts=6, n_group=3, topk_group=2, num_experts_per_tok=2, moe_intermediate_size=16,
               first_k_dense_replace=1, routed_scaling_factor=1.5, tie_word_embeddings=False)
    extra = {"toy": {},  # dsarl's own kind of model: dense MLP, tied embeddings, plain RoPE
             "moe_yarn": {**moe, "rope_parameters": YARN},
             "glm": {**moe, "model_type": "glm_moe_dsa", "indexer_types": ["full", "shared", "full"]}}[kind]
    model = build_model(DSAConfig(**base, **extra), seed=3)
    randomize_(model, 4)
    return model


@pytest.mark.parametrize("kind", ["toy", "moe_yarn", "glm"])
def test_dsarl_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, kind):
    model = dsarl_model(kind)
    save_pretrained(model, tmp_path, max_shard_bytes=None if kind == "toy" else 60_000)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == model.config.model_type
    ids = ids_for(7, vocab=264)
    for attention, k in (("sparse", SPARSE_K), ("dense", DENSE_K)):
        hf = load_hf(tmp_path, index_topk=k)
        hf_logits, hf_picked = hf_forward(hf, ids)
        with torch.no_grad():
            out = model(ids, attention=attention, return_indices=True)
        assert_rel(out.logits, hf_logits)
        if attention == "sparse":
            for layer, picked in hf_picked.items():
                assert_same_selection(out.indices[layer], picked)
    if kind == "toy":
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied, as saved


def test_saved_byte_tokenizer_loads_with_autotokenizer(tmp_path):
    model = dsarl_model("toy")
    save_pretrained(model, tmp_path)
    ours, hf = ByteTokenizer(), AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello world", "Grüße aus Köln", "你好，世界", " two  spaces\n\tand tabs ", ""]:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    assert len(hf) == ours.vocab_size
    for token in ours.special_tokens:
        assert hf.convert_tokens_to_ids(token) == ours.token_id(token)
    _, tok = from_pretrained(tmp_path)
    assert tok.kind == "byte"  # dsarl still reads it as its own byte tokenizer


def test_saved_tokenizer_json_loads_with_autotokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsarl.models import HFTokenizer

    vocab = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "src.json"))
    ours = HFTokenizer(tmp_path / "src.json", {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"})
    save_pretrained(dsarl_model("toy"), tmp_path / "ck", tokenizer=ours)
    hf = AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert hf.encode("hello world", add_special_tokens=False) == ours.encode("hello world") == [3, 4]
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    _, again = from_pretrained(tmp_path / "ck")
    assert again.kind == "hf" and (again.pad_id, again.bos_id, again.eos_id) == (0, 1, 2)


def test_deepseek_v3_checkpoint_gets_a_fresh_indexer_and_saves_as_v32(tmp_path):
    hf = hf_checkpoint(tmp_path / "v3", "deepseek_v3", YARN, 0, seed=13)
    ids = ids_for(8)
    hf_logits, _ = hf_forward(hf, ids)
    ours, _ = from_pretrained(tmp_path / "v3", seed=0, index_n_heads=8, index_head_dim=16, index_topk=SPARSE_K)
    assert ours.config.converted_from == "deepseek_v3" and ours.config.model_type == "deepseek_v32"
    with torch.no_grad():
        assert_rel(ours(ids, attention="dense").logits, hf_logits)  # the dense MLA model is unchanged
    save_pretrained(ours, tmp_path / "v32")
    saved = json.loads((tmp_path / "v32" / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v32" and saved["converted_from"] == "deepseek_v3"
    hf32_logits, _ = hf_forward(load_hf(tmp_path / "v32"), ids)
    with torch.no_grad():
        assert_rel(ours(ids, attention="sparse").logits, hf32_logits)
    again, _ = from_pretrained(tmp_path / "v32")  # now an ordinary deepseek_v32 checkpoint: its indexer loads
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_bf16_checkpoint_loads_as_saved(tmp_path):
    from safetensors import safe_open

    hf_checkpoint(tmp_path, "deepseek_v32", YARN, DENSE_K, seed=14, dtype=torch.bfloat16)
    ours, _ = from_pretrained(tmp_path)
    state = ours.state_dict()
    files = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
    on_disk = {}
    for name in files:
        with safe_open(str(tmp_path / name), "pt") as f:
            on_disk.update({k: f.get_tensor(k) for k in f.keys()})
    assert on_disk.keys() == state.keys()
    for key, value in on_disk.items():
        kept_fp32 = ".mlp.gate." in key or "weights_proj" in key  # router and indexer head weights: fp32 always
        assert state[key].dtype == (torch.float32 if kept_fp32 else value.dtype), key
        assert torch.equal(state[key].to(value.dtype), value), key
    # The logits are compared with both sides computing in fp32 from the bf16 file: in bf16 these tiny random
    # MoE models flip a few percent of routing choices between any two summation orders (transformers' bf16
    # and ours are each ~15% from the fp32 result), so a bf16-vs-bf16 bound would test nothing.
    ids = ids_for(9)
    hf_logits, _ = hf_forward(load_hf(tmp_path, dtype=torch.float32), ids)
    upcast, _ = from_pretrained(tmp_path, torch_dtype="float32")
    with torch.no_grad():
        assert_rel(upcast(ids, attention="dense").logits, hf_logits)


def real_config(model_type: str) -> dict:
    """The keys of the released DeepSeek-V3.2 / GLM-5 config.json (values shrunk)."""
    d = dict(architectures=["X"], attention_bias=False, attention_dropout=0.0, bos_token_id=0, eos_token_id=1,
             ep_size=1, first_k_dense_replace=1, hidden_act="silu", hidden_size=64, index_head_dim=16,
             index_n_heads=4, index_topk=8, initializer_range=0.02, intermediate_size=96, kv_lora_rank=16,
             max_position_embeddings=1024, model_type=model_type, moe_intermediate_size=16, moe_layer_freq=1,
             n_group=2, n_routed_experts=8, n_shared_experts=1, norm_topk_prob=True, num_attention_heads=4,
             num_experts_per_tok=2, num_hidden_layers=3, num_key_value_heads=4, num_nextn_predict_layers=1,
             q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, rms_norm_eps=1e-6, routed_scaling_factor=2.5,
             scoring_func="sigmoid", tie_word_embeddings=False, topk_group=1, topk_method="noaux_tc",
             torch_dtype="bfloat16", transformers_version="4.44.2", use_cache=True, v_head_dim=8, vocab_size=128)
    if model_type == "deepseek_v32":
        d.update(rope_theta=10000, rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                 "mscale_all_dim": 1.0, "original_max_position_embeddings": 64,
                                                 "type": "yarn"},
                 quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]})
    else:
        d.update(eos_token_id=[1, 2], pad_token_id=3, rope_parameters={"rope_theta": 1000000, "rope_type": "default"},
                 dtype="bfloat16", indexer_rope_interleave=True, rope_interleave=True)
    return d


def test_released_config_keys(tmp_path):
    v32 = real_config("deepseek_v32")
    with pytest.raises(ConfigError, match="quantization_config"):
        DSAConfig.from_dict(v32)
    v32.pop("quantization_config")
    cfg = DSAConfig.from_dict(v32)
    assert cfg.rope["rope_type"] == "yarn" and cfg.layer_mlp_types == ["dense", "sparse", "sparse"]
    assert cfg.pad_token_id == 1  # unset in the release: padding uses end-of-text
    glm_keys = real_config("glm_moe_dsa")
    del glm_keys["tie_word_embeddings"], glm_keys["rms_norm_eps"]  # left out: transformers' defaults apply, not ours
    glm = DSAConfig.from_dict(glm_keys)
    assert glm.indexer_rope_interleaved and glm.eos_token_id == [1, 2] and glm.torch_dtype == "bfloat16"
    assert glm.tie_word_embeddings is False and glm.rms_norm_eps == 1e-5
