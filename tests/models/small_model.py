"""The small DSA config the model tests build on."""
from dsarl.models import DSAConfig


def small_cfg(**kw) -> DSAConfig:
    base = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                index_n_heads=3, index_head_dim=16, index_topk=5, index_chunk=7)
    base.update(kw)
    return DSAConfig(**base)
