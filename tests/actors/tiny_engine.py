"""The tiny model the native-engine tests share, and its tokenizer.

initializer_range 0.1: logits spread enough that greedy argmax has no near-ties in fp32. 8 indexer
heads: with few heads a key's ReLU terms are often all 0, and keys tied at score 0 make the top-k
selection (and so the logits) depend on how topk breaks ties, which differs between S lengths.
"""
from dsarl.models import ByteTokenizer, DSAConfig

TOK = ByteTokenizer()
CFG = DSAConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, index_n_heads=8, index_head_dim=16,
                index_topk=6, intermediate_size=128, initializer_range=0.1, max_position_embeddings=128)
