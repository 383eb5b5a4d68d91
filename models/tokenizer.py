"""Tokenizers: a byte-level default (every byte of any language, plus special tokens) and any
Hugging Face `tokenizer.json` through the `tokenizers` library. Both expose the same methods.

Both save a `tokenizer.json` + `tokenizer_config.json` that transformers' AutoTokenizer builds as is. The
byte tokenizer's file is a byte-level BPE with no merges whose vocabulary puts byte b at id b (bytes are
written as GPT-2's printable byte characters, the alphabet the `tokenizers` ByteLevel steps use), then the
special tokens from 256: the same ids as ByteTokenizer. A `dsarl_tokenizer: byte` marker in the config
makes load_tokenizer return ByteTokenizer itself.
"""
import json
from pathlib import Path

# transformers builds a tokenizer.json-backed tokenizer for this class name (v4 and v5 alike)
HF_TOKENIZER_CLASS = "PreTrainedTokenizerFast"

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
ROLES = ("system", "user", "assistant")


class ByteTokenizer:
    """ids 0..255 are bytes; special tokens follow from 256 (so pad=256, bos=257, eos=258)."""

    kind = "byte"

    def __init__(self, special_tokens: list[str] = SPECIAL_TOKENS):
        self.special_tokens = list(special_tokens)
        self.special_to_id = {t: 256 + i for i, t in enumerate(self.special_tokens)}
        self.vocab_size = 256 + len(self.special_tokens)

    def token_id(self, token: str) -> int:
        return self.special_to_id[token]

    @property
    def pad_id(self) -> int:
        return self.special_to_id["<|pad|>"]

    @property
    def bos_id(self) -> int:
        return self.special_to_id["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self.special_to_id["<|eos|>"]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special and i < self.vocab_size:
                out.append(self.special_tokens[i - 256])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_hf(self):
        """The same tokenizer as a `tokenizers.Tokenizer` (ids, bytes and special tokens identical)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        chars = byte_level_chars()
        tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        # no regex split and no prefix space: every byte maps to its own token, nothing is added
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.special_tokens])
        return tok

    def save(self, directory: Path) -> None:
        self.to_hf().save(str(Path(directory) / "tokenizer.json"))
        cfg = {"tokenizer_class": HF_TOKENIZER_CLASS, "dsarl_tokenizer": "byte",
               "dsarl_special_tokens": self.special_tokens, "bos_token": self.special_tokens[1],
               "eos_token": self.special_tokens[2], "pad_token": self.special_tokens[0]}
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def byte_level_chars() -> dict[int, str]:
    """byte -> the printable character byte-level BPE writes it as (GPT-2's table): printable Latin-1
    bytes stand for themselves, the 68 others take 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    out, shifted = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


class HFTokenizer:
    """A `tokenizer.json` (Hugging Face tokenizers) with the same interface as ByteTokenizer."""

    kind = "hf"

    def __init__(self, path: Path, special: dict[str, str] | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self.tok.get_vocab_size()
        self.special = special or {}

    def token_id(self, token: str) -> int:
        tid = self.tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in {self.path}")
        return tid

    def _special_id(self, role: str, default: str) -> int:
        return self.token_id(self.special.get(role, default))

    @property
    def pad_id(self) -> int:
        return self._special_id("pad", "<|pad|>")

    @property
    def bos_id(self) -> int:
        return self._special_id("bos", "<|bos|>")

    @property
    def eos_id(self) -> int:
        return self._special_id("eos", "<|eos|>")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, directory: Path) -> None:
        self.tok.save(str(Path(directory) / "tokenizer.json"))
        cfg = {"tokenizer_class": HF_TOKENIZER_CLASS, "dsarl_special": self.special,
               **{f"{role}_token": token for role, token in self.special.items() if role in ("bos", "eos", "pad")}}
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _special_from_hf_config(cfg: dict) -> dict[str, str]:
    """Our role -> token map from a tokenizer_config.json: dsarl's own key, else transformers' bos/eos/pad_token
    (a string or an AddedToken dict)."""
    if "dsarl_special" in cfg or "special" in cfg:
        return cfg.get("dsarl_special", cfg.get("special")) or {}
    out = {}
    for role in ("bos", "eos", "pad"):
        token = cfg.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            out[role] = token
    if "pad" not in out and "eos" in out:
        out["pad"] = out["eos"]  # many released tokenizers have no pad token; padding is masked anyway
    return out


def load_tokenizer(directory: str | Path | None):
    """The checkpoint's tokenizer: ours (byte) where the config says so, else tokenizer.json, else byte."""
    directory = Path(directory) if directory is not None else None
    cfg_path = directory / "tokenizer_config.json" if directory is not None else None
    cfg = json.loads(cfg_path.read_text()) if cfg_path is not None and cfg_path.exists() else None
    if cfg is not None and (cfg.get("dsarl_tokenizer") == "byte" or cfg.get("tokenizer_class") == "ByteTokenizer"):
        return ByteTokenizer(cfg.get("dsarl_special_tokens", cfg.get("special_tokens", SPECIAL_TOKENS)))
    if directory is not None and (directory / "tokenizer.json").exists():
        return HFTokenizer(directory / "tokenizer.json", _special_from_hf_config(cfg or {}))
    return ByteTokenizer()


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat: <|role|> content <|end|> per message, then <|assistant|> to prompt a reply.

    Built from ids (not by parsing special-token text), so user text can never inject a role marker.
    """
    ids = [tokenizer.bos_id]
    for m in messages:
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {role!r}")
        ids += [tokenizer.token_id(f"<|{role}|>"), *tokenizer.encode(m["content"]), tokenizer.token_id("<|end|>")]
    if add_generation_prompt:
        ids.append(tokenizer.token_id("<|assistant|>"))
    return ids
