"""Where a stage's model comes from: a fresh model from a config file, or an existing checkpoint."""
from dataclasses import dataclass, field
from typing import Any

from dsarl.models import ByteTokenizer, DSAConfig, build_model, from_pretrained


@dataclass
class ModelSpec:
    config: str | None = None  # model config file (YAML/JSON, HF DeepSeek-V3.2 keys): a fresh model
    init_from: str | None = None  # or a checkpoint directory to start from
    overrides: dict[str, Any] = field(default_factory=dict)  # DSAConfig keys to change (attention, index_topk...)
    # with init_from: drop the checkpoint's indexer and start a fresh one (seeded by the stage's seed),
    # whose shape overrides may change (index_n_heads, index_head_dim): the indexer warm-up of a dense
    # model that has no indexer, or one too small for its attention
    new_indexer: bool = False


def load_model_from_spec(spec: ModelSpec, seed: int = 0, device=None, resolve=lambda p: p):
    """-> (model, tokenizer). `resolve` maps a config-relative path to a real one."""
    if (spec.config is None) == (spec.init_from is None):
        raise ValueError("model: set exactly one of 'config' (a fresh model) or 'init_from' (a checkpoint)")
    if spec.init_from is not None:
        return from_pretrained(resolve(spec.init_from), device=device, new_indexer=spec.new_indexer,
                               seed=seed if spec.new_indexer else None,
                               **spec.overrides)
    if spec.new_indexer:
        raise ValueError("model: new_indexer needs init_from (a fresh model's indexer is new already)")
    cfg = DSAConfig.from_file(resolve(spec.config))
    if spec.overrides:
        cfg = cfg.replace(**spec.overrides)
    return build_model(cfg, device=device, seed=seed), ByteTokenizer()
