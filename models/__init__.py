"""The DSA decoder (MLA + lightning indexer + top-k), its config, KV caches, tokenizers, checkpoints."""
from .attention import IndexerAux
from .checkpoint import atomic_directory_write, from_pretrained, save_pretrained
from .config import ConfigError, DSAConfig
from .kv_cache import PrefixKV, StaticKVCache
from .model import DecoderOutput, DSAForCausalLM, build_model
from .tokenizer import ByteTokenizer, HFTokenizer, apply_chat_template, load_tokenizer

__all__ = [
    "IndexerAux", "atomic_directory_write", "from_pretrained", "save_pretrained", "ConfigError", "DSAConfig",
    "PrefixKV", "StaticKVCache", "DecoderOutput", "DSAForCausalLM", "build_model", "ByteTokenizer",
    "HFTokenizer", "apply_chat_template", "load_tokenizer",
]
