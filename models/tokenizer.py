"""Tokenizers: a byte-level default (every byte of any language, plus special tokens) and any
Hugging Face `tokenizer.json` through the `tokenizers` library. Both expose the same methods.
"""
import json
from pathlib import Path

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

    def save(self, directory: Path) -> None:
        cfg = {"tokenizer_class": "ByteTokenizer", "special_tokens": self.special_tokens}
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


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
        cfg = {"tokenizer_class": "HFTokenizer", "special": self.special}
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def load_tokenizer(directory: str | Path | None):
    """The checkpoint's tokenizer: tokenizer.json if present, else the byte-level default."""
    directory = Path(directory) if directory is not None else None
    if directory is not None and (directory / "tokenizer.json").exists():
        cfg_path = directory / "tokenizer_config.json"
        special = json.loads(cfg_path.read_text()).get("special", {}) if cfg_path.exists() else {}
        return HFTokenizer(directory / "tokenizer.json", special)
    if directory is not None and (directory / "tokenizer_config.json").exists():
        cfg = json.loads((directory / "tokenizer_config.json").read_text())
        return ByteTokenizer(cfg.get("special_tokens", SPECIAL_TOKENS))
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
