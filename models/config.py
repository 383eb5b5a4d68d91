"""DSA decoder config. Keys follow Hugging Face's DeepSeek-V3.2 / GLM-5 config.json (DESIGN.md section 2).

A config.json written by us is read by transformers' AutoConfig as the same model, and theirs by us:
models/hf_config.py maps their spellings onto these keys, drops keys with no effect on the forward
pass and refuses, naming the key, those describing a layer we do not build.
"""
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from . import hf_config
from .rope import normalize_rope_parameters, softmax_scale_factor


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
    eos_token_id: int | list[int] = 258  # a list (GLM-5): any of them ends a sequence
    pad_token_id: int = 256
    torch_dtype: str = "float32"
    # dsarl's own keys
    attention: Literal["dense", "sparse"] = "dense"  # dense predecessor or DSA (top-k) attention
    index_fp8: bool = False  # FP8 e4m3 quantize-dequantize of the indexer's q and k (per-token scales)
    index_chunk: int = 1024  # queries per chunk when scoring + selecting (memory O(chunk * L))
    index_dense_when_all_fit: bool = True  # sparse mode runs dense kernels when every query sees <= k keys
    # Mixture of Experts (DeepSeek-V3 MoE; models/moe.py). n_routed_experts None/0: a dense SwiGLU everywhere.
    n_routed_experts: int | None = None
    n_shared_experts: int = 1  # always-on experts of width moe_intermediate_size each
    moe_intermediate_size: int = 128  # one routed expert's SwiGLU inner width
    num_experts_per_tok: int = 2  # routed experts per token (top-k of the router)
    n_group: int = 1  # expert groups; a token's experts come from its topk_group best groups
    topk_group: int = 1
    norm_topk_prob: bool = True  # renormalise the chosen experts' sigmoid scores to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights
    first_k_dense_replace: int = 0  # the first k layers have a dense MLP (with MoE)
    mlp_layer_types: list[str] | None = None  # per layer "dense" | "sparse" (MoE); default from the two above
    rope_parameters: dict | None = None  # {"rope_type": "default" | "yarn", ...}; rope_theta when absent
    indexer_types: list[str] | None = None  # GLM-5, per layer "full" (own indexer) | "shared" (previous full
    # layer's selection); default: every layer "full"
    model_type: Literal["deepseek_v32", "glm_moe_dsa"] = "deepseek_v32"  # fixes the indexer's RoPE layout
    converted_from: Literal["deepseek_v3"] | None = None  # loaded from a checkpoint without an indexer, whose
    # indexer was initialised fresh (it needs the warm-up stage)

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope(self) -> dict:
        """rope_parameters normalized (rope_type and rope_theta always present)."""
        return normalize_rope_parameters(self.rope_parameters, self.rope_theta, self.max_position_embeddings)

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * softmax_scale_factor(self.rope)  # YaRN's mscale^2 (1 without)

    @property
    def dense_within(self) -> int:
        """The most keys a query may see for sparse attention to run dense: its top-k selects every visible
        key, so sparse attention *is* dense attention, and the dense kernels skip the indexer (the paper's
        "masked MHA mode" for short sequences). 0 with index_dense_when_all_fit off."""
        return self.index_topk if self.index_dense_when_all_fit else 0

    def attention_within(self, attention: str, max_keys: int) -> str:
        """The attention a forward runs when none of its queries sees more than max_keys keys. Decided
        where a whole run's length is known up front (an engine's cache, a learner's batch), which also
        skips the indexer's keys; a sparse forward's layers check the same per call (models/attention.py)."""
        return "dense" if attention == "sparse" and max_keys <= self.dense_within else attention

    @property
    def layer_mlp_types(self) -> list[str]:
        if self.mlp_layer_types is not None:
            return list(self.mlp_layer_types)
        n_dense = self.num_hidden_layers if not self.n_routed_experts else min(self.first_k_dense_replace,
                                                                              self.num_hidden_layers)
        return ["dense"] * n_dense + ["sparse"] * (self.num_hidden_layers - n_dense)

    @property
    def layer_indexer_types(self) -> list[str]:
        return list(self.indexer_types) if self.indexer_types is not None else ["full"] * self.num_hidden_layers

    @property
    def indexer_rope_interleaved(self) -> bool:
        """GLM-5's indexer rotates interleaved pairs; DeepSeek-V3.2's half-split pairs (models/rope.py)."""
        return self.model_type == "glm_moe_dsa"

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
        if self.model_type not in hf_config.MODEL_TYPES:
            raise ConfigError(f"key 'model_type' must be one of {hf_config.MODEL_TYPES}, got {self.model_type!r}")
        try:
            rope = self.rope
        except ValueError as e:
            raise ConfigError(f"key 'rope_parameters': {e}") from None
        if rope["rope_theta"] != self.rope_theta:
            raise ConfigError(f"key 'rope_theta' = {self.rope_theta} differs from rope_parameters' rope_theta "
                              f"{rope['rope_theta']}")
        self._validate_moe()
        self._validate_layer_types()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            for token in value if isinstance(value, list) else [value]:
                if not isinstance(token, int) or not 0 <= token < self.vocab_size:
                    raise ConfigError(f"key '{name}' = {value} is outside vocab_size {self.vocab_size}")

    def _validate_moe(self) -> None:
        if not self.n_routed_experts:
            return
        E, groups = self.n_routed_experts, self.n_group
        for name in ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"key '{name}' must be a positive integer with MoE, got {value!r}")
        if E % groups:
            raise ConfigError(f"key 'n_group' = {groups} does not divide n_routed_experts = {E}")
        if self.topk_group > groups:
            raise ConfigError(f"key 'topk_group' = {self.topk_group} exceeds n_group = {groups}")
        if groups > 1 and E // groups < 2:
            raise ConfigError(f"key 'n_group' = {groups}: a group is scored by its two best experts, so it needs >= 2")
        if self.num_experts_per_tok > self.topk_group * (E // groups):
            raise ConfigError(f"key 'num_experts_per_tok' = {self.num_experts_per_tok} exceeds the experts of "
                              f"topk_group groups ({self.topk_group * (E // groups)})")

    def _validate_layer_types(self) -> None:
        L = self.num_hidden_layers
        for name, values, allowed in (("mlp_layer_types", self.mlp_layer_types, ("dense", "sparse")),
                                      ("indexer_types", self.indexer_types, ("full", "shared"))):
            if values is None:
                continue
            if len(values) != L or set(values) - set(allowed):
                raise ConfigError(f"key '{name}' must list {L} values from {allowed}, got {values!r}")
        if "sparse" in self.layer_mlp_types and not self.n_routed_experts:
            raise ConfigError("key 'mlp_layer_types' has MoE ('sparse') layers but n_routed_experts is unset")
        if self.layer_indexer_types[0] != "full":
            raise ConfigError("key 'indexer_types': layer 0 must be 'full' (a shared layer reuses an earlier selection)")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "DSAConfig":
        known = {f.name for f in fields(cls)}
        try:
            d = hf_config.from_hf(d)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        kwargs = {}
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
            else:
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
        """config.json content: our keys plus what transformers needs to build the same model."""
        return hf_config.to_hf(asdict(self), self.layer_mlp_types,
                               self.layer_indexer_types, self.rope)

    def replace(self, **changes) -> "DSAConfig":
        d = asdict(self)
        d.update(changes)
        return DSAConfig.from_dict(d)
