"""The DSA decoder: embeddings, N x (RMSNorm -> MLA+indexer -> RMSNorm -> SwiGLU or MoE), RMSNorm, LM head.

Module names match Hugging Face's DeepSeek-V3.2 / GLM-5 layout (model.layers.{i}.self_attn.q_a_proj, ...,
self_attn.indexer.wq_b, mlp.experts.{e}.gate_proj, ...), so our state_dict *is* that checkpoint's weight naming.
Per layer, `indices` (top-k selection) and `experts` (MoE routing) can be returned, and given back to
replay them exactly. A GLM-5 "shared" layer reuses the selection of the previous "full" layer.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import MLA, IndexerAux
from .config import DSAConfig
from .doc_mask import document_causal_mask, document_positions
from .layers import RMSNorm, SwiGLU
from .moe import MoE, TopkRouter
from .rope import rope_for_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, T, V] (fp32 if the model is fp32)
    indices: list[torch.Tensor] | None  # per layer [B, T, K] top-k selections (sparse)
    aux: list[IndexerAux] | None  # per layer, when collect_aux
    experts: list[torch.Tensor | None] | None = None  # per layer [B, T, k] routed experts (None: dense MLP layer)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DSAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, has_indexer=cfg.layer_indexer_types[layer_idx] == "full")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.layer_mlp_types[layer_idx] == "sparse":
            self.mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.n_shared_experts,
                           cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                           cfg.routed_scaling_factor)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, positions, cache, attention, indices, collect_aux, doc_mask=None, experts=None,
                query_slice: slice | None = None):
        """-> (x, indices, aux, experts [B, T, k] | None for a dense MLP). query_slice: only those positions
        come out (every position's key and value still reach the cache)."""
        h, indices, aux = self.self_attn(self.input_layernorm(x), cos, sin, positions, self.layer_idx, cache,
                                         attention, indices, collect_aux, doc_mask, query_slice)
        x = (x if query_slice is None else x[:, query_slice]) + h
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            h, experts = self.mlp(h, experts)
        else:
            h, experts = self.mlp(h), None
        return x + h, indices, aux, experts


class DSAModel(nn.Module):
    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def is_indexer_weight(name: str) -> bool:
    """Whether a state-dict / parameter name belongs to a layer's lightning indexer (HF layout:
    model.layers.N.self_attn.indexer.*): the part the warm-up trains and new_indexer replaces."""
    return ".indexer." in name


class DSAForCausalLM(nn.Module):
    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.config = cfg
        self.model = DSAModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, TopkRouter)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def indexer_parameters(self):
        return [p for n, p in self.named_parameters() if is_indexer_weight(n)]

    def keep_fp32_(self) -> "DSAForCausalLM":
        """After a dtype cast: router weights/bias and the indexer's head weights back to fp32, as the
        checkpoints store them (their outputs rank experts and keys; transformers keeps them fp32 too)."""
        for name, module in self.named_modules():
            if isinstance(module, TopkRouter) or name.endswith("indexer.weights_proj"):
                module.float()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T]; default: after the cache's tokens, else 0..T-1
        cache=None,  # StaticKVCache | PrefixKV | None
        attention: str | None = None,  # "dense" | "sparse"; default: config.attention
        indices: list[torch.Tensor] | None = None,  # per layer precomputed top-k (e.g. the sampler's)
        return_indices: bool = False,
        collect_aux: bool = False,
        logits_slice: slice | None = None,  # logits only for these positions (the last layer runs only them)
        experts: list[torch.Tensor | None] | None = None,  # per MoE layer [B, T, k] routing to replay
        return_experts: bool = False,
        doc_ids: torch.Tensor | None = None,  # [B, T] packed documents (models/doc_mask.py): each token
        # sees only its own document, whose positions restart at 0
    ) -> DecoderOutput:
        B, T = input_ids.shape
        attention = attention or self.config.attention
        if attention not in ("dense", "sparse"):
            raise ValueError(f"attention must be 'dense' or 'sparse', got {attention!r}")
        doc_mask = None
        if doc_ids is not None:
            if attention != "dense" or cache is not None or collect_aux or positions is not None:
                # the sparse kernels and the indexer take causal positions, not a document mask
                raise ValueError("doc_ids (packed documents) needs dense attention, no cache, no aux and no "
                                 "explicit positions")
            positions = document_positions(doc_ids)
            doc_mask = document_causal_mask(doc_ids)
        if positions is None:
            positions = (cache.next_positions(T) if cache is not None else torch.arange(T)[None]).to(input_ids.device)
            positions = positions.expand(B, T)
        cos, sin = rope_for_config(self.config, positions)
        x = self.model.embed_tokens(input_ids)
        # Past the last layer only logits_slice's rows matter, and the last layer's other positions only
        # write their keys and values: it runs its queries, attention output and MLP on the slice alone
        # (exact; a prefill of P tokens into L layers saves about 1/L of its work). Not where a caller
        # wants every position's routing or indexer inputs. Returned selections then cover the slice only.
        last_slice = logits_slice if (logits_slice is not None and not collect_aux and not return_experts
                                      and experts is None and doc_mask is None) else None
        n_layers = len(self.model.layers)
        all_indices, all_aux, all_experts, shared = [], [], [], None
        for i, layer in enumerate(self.model.layers):
            idx = None if indices is None else indices[i]
            if idx is None and layer.self_attn.indexer is None:
                idx = shared  # GLM-5 "shared" layer: the previous full layer's selection
            x, idx, aux, routed = layer(x, cos, sin, positions, cache, attention, idx, collect_aux, doc_mask,
                                        None if experts is None else experts[i],
                                        last_slice if i == n_layers - 1 else None)
            if layer.self_attn.indexer is not None:
                shared = idx
            all_indices.append(idx if last_slice is None or idx is None or i == n_layers - 1 else idx[:, last_slice])
            all_aux.append(aux)
            all_experts.append(routed)
        if cache is not None:
            cache.advance(positions)
        x = self.model.norm(x)
        if logits_slice is not None and last_slice is None:
            x = x[:, logits_slice]
        logits = self.lm_head(x)
        return DecoderOutput(
            logits=logits,
            indices=all_indices if (return_indices and attention == "sparse") else None,
            aux=all_aux if collect_aux else None,
            experts=all_experts if return_experts else None,
        )


def build_model(cfg: DSAConfig, device=None, seed: int | None = None) -> DSAForCausalLM:
    if seed is not None:
        torch.manual_seed(seed)
    return DSAForCausalLM(cfg).to(device=device, dtype=DTYPES[cfg.torch_dtype]).keep_fp32_()
