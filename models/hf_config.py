"""Hugging Face config.json <-> dsarl config keys, for the model types deepseek_v32, glm_moe_dsa and deepseek_v3.

Reading: keys that carry no meaning for the forward pass are dropped; keys whose value we cannot build
(FP8 block quantization, bias in attention, a scoring function other than sigmoid, ...) are refused
with the key and the value named; legacy spellings (`rope_scaling`, `dtype`, GLM-5's indexer pattern
keys) are mapped onto ours. A deepseek_v3 checkpoint (dense MLA, no indexer) becomes a deepseek_v32
model whose indexer is initialised fresh (`converted_from: deepseek_v3` records it).
Writing: a config that transformers' AutoConfig builds the same model from (every default of theirs
that differs from ours is written out, e.g. num_key_value_heads, mlp_layer_types).
Both directions work on plain dicts; config.py turns the ValueErrors into ConfigErrors naming the file.
"""

MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")
ARCHITECTURES = {"deepseek_v32": "DeepseekV32ForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM"}

# Keys with no effect on the forward pass (training-time MoE losses, serving, bookkeeping): dropped.
IGNORED_KEYS = {
    "architectures", "auto_map", "transformers_version", "use_cache", "attention_dropout", "pretraining_tp",
    "num_nextn_predict_layers", "num_mtp_layers", "ep_size", "aux_loss_alpha", "seq_aux", "output_router_logits",
    "_name_or_path", "torch_dtype_", "head_dim", "layer_types", "rope_interleave", "indexer_rope_interleave",
    "qk_head_dim",
}

# Keys whose only supported value is the one given: anything else is a layer we do not build.
REQUIRED_VALUES = {
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "moe_layer_freq": 1, "rope_interleave": True,
}

# transformers' defaults for keys a released config.json may leave out, where ours differ (ours suit toy
# models): applied only to configs written by transformers or a model release (they carry
# transformers_version; ours do not, and always list every key).
HF_DEFAULTS = {
    "deepseek_v32": dict(tie_word_embeddings=False, first_k_dense_replace=3, n_group=8, topk_group=4,
                         num_experts_per_tok=8, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                         rms_norm_eps=1e-6, max_position_embeddings=163840, bos_token_id=0, eos_token_id=1),
    "glm_moe_dsa": dict(tie_word_embeddings=False, first_k_dense_replace=3, n_group=1, topk_group=1,
                        num_experts_per_tok=8, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                        rms_norm_eps=1e-5, max_position_embeddings=202752, bos_token_id=0, eos_token_id=1),
    "deepseek_v3": dict(tie_word_embeddings=False, first_k_dense_replace=3, n_group=8, topk_group=4,
                        num_experts_per_tok=8, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                        rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1),
}

# DeepSeek-V3.2's indexer shape, given to a deepseek_v3 checkpoint that has none (overridable).
V32_INDEXER_DEFAULTS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}


def _glm_indexer_types(d: dict, n_layers: int) -> list[str] | None:
    """GLM-5's per-layer indexer pattern from `index_topk_pattern` ("FSS..." or a list) or from
    `index_topk_freq` / `index_skip_topk_offset`: layer i runs its own indexer when
    max(i - offset + 1, 0) is a multiple of freq (defaults 1 and 2: every layer)."""
    pattern = d.pop("index_topk_pattern", None)
    freq = max(d.pop("index_topk_freq", 1) or 1, 1)
    offset = d.pop("index_skip_topk_offset", 2)
    if pattern is not None:
        if isinstance(pattern, str):
            letters = {"F": "full", "S": "shared"}
            if set(pattern) - set(letters):
                raise ValueError(f"key 'index_topk_pattern' = {pattern!r}: letters must be F or S")
            return [letters[c] for c in pattern]
        return list(pattern)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_layers)]


def from_hf(d: dict) -> dict:
    """A config.json mapping (ours or Hugging Face's) -> dsarl DSAConfig keyword arguments (unknown keys
    are left in for DSAConfig.from_dict to report)."""
    d = dict(d)
    model_type = d.pop("model_type", "deepseek_v32")
    if "transformers_version" in d:
        for key, value in HF_DEFAULTS.get(model_type, {}).items():
            d.setdefault(key, value)
    if model_type == "deepseek_v3":
        d["converted_from"] = "deepseek_v3"
        model_type = "deepseek_v32"
        for key, value in V32_INDEXER_DEFAULTS.items():
            d.setdefault(key, value)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"key 'model_type' = {model_type!r} is not supported "
                         f"(supported: {', '.join(MODEL_TYPES)}, deepseek_v3)")
    d["model_type"] = model_type
    _refuse_unsupported(d, model_type)
    _map_spellings(d)
    return {k: v for k, v in d.items() if k not in IGNORED_KEYS}


def _refuse_unsupported(d: dict, model_type: str) -> None:
    """Raises ValueError naming the first key whose value describes something we do not build."""
    if d.get("quantization_config") is not None:
        raise ValueError(f"key 'quantization_config' = {d['quantization_config']!r}: quantized checkpoints are not "
                         f"supported (dequantize the weights to bf16 first)")
    d.pop("quantization_config", None)
    for key, value in REQUIRED_VALUES.items():
        if key in d and (given := d.pop(key)) != value:
            raise ValueError(f"key '{key}' = {given!r} is not supported (only {value!r})")
    if "indexer_rope_interleave" in d and bool(d["indexer_rope_interleave"]) != (model_type == "glm_moe_dsa"):
        raise ValueError(f"key 'indexer_rope_interleave' = {d['indexer_rope_interleave']!r} contradicts model_type "
                         f"{model_type!r} (transformers fixes the indexer's RoPE layout by model type)")
    kv_heads = d.pop("num_key_value_heads", None)
    if kv_heads is not None and kv_heads != d.get("num_attention_heads", kv_heads):
        raise ValueError(f"key 'num_key_value_heads' = {kv_heads}: MLA has one latent KV per token; it must equal "
                         f"num_attention_heads ({d.get('num_attention_heads')})")
    layer_types = d.get("layer_types")
    if layer_types is not None and set(layer_types) - {"indexed_attention"}:
        raise ValueError(f"key 'layer_types' = {layer_types!r}: only 'indexed_attention' layers are supported")


def _map_spellings(d: dict) -> None:
    """In place: dtype, rope_scaling and GLM-5's indexer pattern keys onto ours; pad (and bos) when unset."""
    if "dtype" in d:
        d.setdefault("torch_dtype", d.pop("dtype"))
    rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
    d.pop("rope_scaling", None)
    if rope is not None:
        d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        d["rope_parameters"] = dict(rope)
    if any(k in d for k in ("index_topk_pattern", "index_topk_freq", "index_skip_topk_offset")):
        types = _glm_indexer_types(d, d.get("num_hidden_layers", 0))
        d.setdefault("indexer_types", types)
    eos = d.get("eos_token_id")
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    # released configs leave pad (sometimes bos) unset; our engine pads with pad_token_id: end-of-text it is
    if d.get("pad_token_id") is None and first_eos is not None:
        d["pad_token_id"] = first_eos
    if "bos_token_id" in d and d["bos_token_id"] is None and first_eos is not None:
        d["bos_token_id"] = first_eos


def to_hf(d: dict, mlp_layer_types: list[str], indexer_types: list[str], rope: dict) -> dict:
    """dsarl DSAConfig fields (asdict) -> a config.json that AutoConfig reads as the same model."""
    out = dict(d)
    model_type = out["model_type"]
    out["architectures"] = [ARCHITECTURES[model_type]]
    out["num_key_value_heads"] = out["num_attention_heads"]
    out["hidden_act"], out["attention_bias"], out["mlp_bias"] = "silu", False, False
    out["n_routed_experts"] = out["n_routed_experts"] or 0  # transformers wants an int; no MoE layer reads it
    out["mlp_layer_types"] = list(mlp_layer_types)
    out["rope_parameters"] = dict(rope)
    out["dtype"] = out["torch_dtype"]
    if model_type == "glm_moe_dsa":
        out["indexer_types"] = list(indexer_types)
    else:
        out.pop("indexer_types")
    if out.get("converted_from") is None:
        out.pop("converted_from", None)
    return out
