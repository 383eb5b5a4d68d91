"""DSA decoder config. Keys follow Hugging Face's DeepSeek-V3.2 config.json (DESIGN.md section 2).

A config.json written by us is readable by tools for that architecture, and theirs by us: keys of the
full model that this dense-MLP decoder does not use (MoE routing, quantisation, ...) are accepted
when they describe a layer we can build, and refused with a clear error when they do not.
"""
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

# Keys of the HF DeepSeek-V3.2 config that carry no meaning for a dense-MLP decoder: read and ignored.
IGNORED_HF_KEYS = {
    "architectures", "model_type", "auto_map", "transformers_version", "torch_dtype_", "use_cache",
    "attention_bias", "attention_dropout", "hidden_act", "pretraining_tp", "num_key_value_heads",
    "quantization_config", "num_nextn_predict_layers", "ep_size", "aux_loss_alpha", "seq_aux",
    "scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor", "topk_group", "n_group",
    "moe_layer_freq", "moe_intermediate_size", "num_experts_per_tok", "n_shared_experts",
    "first_k_dense_replace", "rope_scaling",
}


class ConfigError(ValueError):
    """A config problem, naming the key and (where known) the file."""


@dataclass
class DSAConfig:
    vocab_size: int = 264
    hidden_size: int = 256  # d_model
    intermediate_size: int = 640  # SwiGLU inner width
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int = 128  # query compression rank (also feeds the indexer's queries)
    kv_lora_rank: int = 64  # latent c_kv width: what the KV cache stores per token
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # decoupled RoPE dims (shared key, per-head query)
    v_head_dim: int = 32
    index_n_heads: int = 4  # lightning indexer heads H_I
    index_head_dim: int = 32  # d_I; RoPE on its first qk_rope_head_dim dims
    index_topk: int = 64  # k of the top-k selection
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int = 257
    eos_token_id: int = 258
    pad_token_id: int = 256
    torch_dtype: str = "float32"
    # dsarl's own keys
    attention: Literal["dense", "sparse"] = "dense"  # dense predecessor or DSA (top-k) attention
    index_fp8: bool = False  # FP8 e4m3 quantize-dequantize of the indexer's q and k (per-token scales)
    index_chunk: int = 1024  # queries per chunk when scoring + selecting (memory O(chunk * L))
    index_dense_when_all_fit: bool = True  # sparse mode runs dense kernels when every query sees <= k keys
    n_routed_experts: int | None = None  # HF key; only None/0 (dense MLP) is supported

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "index_n_heads", "index_head_dim", "index_topk", "max_position_embeddings", "index_chunk",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"key '{name}' must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"key 'qk_rope_head_dim' must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(
                f"key 'index_head_dim' ({self.index_head_dim}) must be >= qk_rope_head_dim "
                f"({self.qk_rope_head_dim}): the indexer applies RoPE to its first qk_rope_head_dim dims"
            )
        if self.attention not in ("dense", "sparse"):
            raise ConfigError(f"key 'attention' must be 'dense' or 'sparse', got {self.attention!r}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"key 'torch_dtype' must be float32, bfloat16 or float16, got {self.torch_dtype!r}")
        if self.n_routed_experts:
            raise ConfigError(f"key 'n_routed_experts' = {self.n_routed_experts}: MoE layers are not supported")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"key '{name}' = {getattr(self, name)} is outside vocab_size {self.vocab_size}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "DSAConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
            elif key not in IGNORED_HF_KEYS:
                raise ConfigError(f"{source}: unknown key '{key}' (known keys: {', '.join(sorted(known))})")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "DSAConfig":
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["architectures"] = ["DeepseekV32ForCausalLM"]
        d["model_type"] = "deepseek_v32"
        return d

    def replace(self, **changes) -> "DSAConfig":
        d = asdict(self)
        d.update(changes)
        return DSAConfig.from_dict(d)
