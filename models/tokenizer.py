"""Tokenizers: a byte-level default (every byte of any language, plus special tokens) and any
Hugging Face tokenizer directory (tokenizer.json through the `tokenizers` library; bos/eos/pad and the Jinja
chat template from tokenizer_config.json, as transformers reads them). Both expose the same methods.

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
# dsarl's own chat format (apply_chat_template) as Jinja, saved with the byte tokenizer so AutoTokenizer applies it
# too; the ids are the same unless message text spells a marker such as <|user|> (dsarl keeps that as bytes)
BYTE_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class ByteTokenizer:
    """ids 0..255 are bytes; special tokens follow from 256 (so pad=256, bos=257, eos=258)."""

    kind = "byte"
    chat_template = None  # dsarl's own chat format (apply_chat_template), built from ids
    stop_strings: tuple[str, ...] = ()

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

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return apply_chat_template(self, messages, add_generation_prompt)

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
               "eos_token": self.special_tokens[2], "pad_token": self.special_tokens[0],
               "chat_template": BYTE_CHAT_TEMPLATE}  # for transformers: dsarl builds the same ids itself
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
    """A Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) with ByteTokenizer's interface.

    bos/eos/pad/unk come from tokenizer_config.json (else special_tokens_map.json), as transformers reads
    them; a role the config leaves out (or sets to null: many tokenizers have no bos) falls back to dsarl's
    `<|bos|>`-style name when the vocabulary has it, else bos is None (nothing is prepended) and pad is eos.
    `stop_ids`: eos plus the `eos_token_id`s of generation_config.json / config.json beside it (chat models
    end a turn with a token other than eos); `stop_strings`: generation_config.json's.
    """

    kind = "hf"

    def __init__(self, path: Path, special: dict[str, str] | None = None, chat_template: str | None = None,
                 config: dict | None = None, extra_stop_ids: tuple[int, ...] = (), stop_strings: tuple[str, ...] = ()):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self.tok.get_vocab_size()
        self.special = dict(special or {})
        self.chat_template = chat_template
        self.config = dict(config or {})  # the tokenizer_config.json it came from, written back by save()
        self.extra_stop_ids = tuple(extra_stop_ids)
        self.stop_strings = tuple(stop_strings)

    def token_id(self, token: str) -> int:
        tid = self.tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in {self.path}")
        return tid

    def _special_id(self, role: str) -> int | None:
        if role in self.special:
            return self.token_id(self.special[role])  # configured but missing: an error, not a silent None
        return self.tok.token_to_id(f"<|{role}|>")

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos")

    @property
    def pad_id(self) -> int:
        pad = self._special_id("pad")
        if pad is None:
            pad = self.eos_id  # many released tokenizers have no pad token; padding is masked anyway
        return 0 if pad is None else pad

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every token id that ends a completion: eos, then generation_config.json's eos ids."""
        ids = [] if self.eos_id is None else [self.eos_id]
        return tuple(dict.fromkeys([*ids, *self.extra_stop_ids]))

    def special_tokens_map(self) -> dict[str, str]:
        """{"bos_token": ..., "eos_token": ...}: what a chat template sees, as in transformers (the tokens the
        config names; not pad's fallback to eos)."""
        out = {}
        for role in SPECIAL_ROLES:
            tid = self._special_id(role)
            if tid is not None:
                out[f"{role}_token"] = self.tok.id_to_token(tid)
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return apply_chat_template(self, messages, add_generation_prompt)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, directory: Path) -> None:
        """tokenizer.json + tokenizer_config.json (the original config's keys kept, special tokens and the chat
        template written into it), which AutoTokenizer loads with the same ids and template."""
        self.tok.save(str(Path(directory) / "tokenizer.json"))
        cfg = {"tokenizer_class": HF_TOKENIZER_CLASS, **self.config, "dsarl_special": self.special,
               **{f"{role}_token": token for role, token in self.special.items() if role in SPECIAL_ROLES}}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        if self.stop_strings:
            cfg["dsarl_stop_strings"] = list(self.stop_strings)
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        if self.extra_stop_ids:  # transformers' generate() stops on these too
            (Path(directory) / "generation_config.json").write_text(
                json.dumps({"eos_token_id": list(self.extra_stop_ids)}, indent=2))


SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def _special_from_hf_config(cfg: dict, special_map: dict | None = None) -> dict[str, str]:
    """Our role -> token map from a tokenizer_config.json: dsarl's own key, else transformers' bos/eos/pad/unk_token
    (then special_tokens_map.json's, which older tokenizers keep them in). Null roles are left out."""
    if "dsarl_special" in cfg or "special" in cfg:
        return cfg.get("dsarl_special", cfg.get("special")) or {}
    out = {}
    for role in SPECIAL_ROLES:
        key = f"{role}_token"
        token = _token_text(cfg[key]) if key in cfg else _token_text((special_map or {}).get(key))
        if token is not None:
            out[role] = token
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _stops_beside(directory: Path, tokenizer_config: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(eos ids, stop strings) of a checkpoint directory: generation_config.json's eos_token_id (else
    config.json's, as transformers' generate() takes them), generation_config.json's stop_strings (and those
    HFTokenizer.save kept in tokenizer_config.json)."""
    gen = _read_json(directory / "generation_config.json")
    source = gen if "eos_token_id" in gen else _read_json(directory / "config.json")
    ids = [int(i) for i in _as_list(source.get("eos_token_id"))]
    strings = [str(s) for s in (*_as_list(gen.get("stop_strings")), *tokenizer_config.get("dsarl_stop_strings", []))]
    return tuple(dict.fromkeys(ids)), tuple(dict.fromkeys(strings))


def load_tokenizer(directory: str | Path | None):
    """The checkpoint's tokenizer: ours (byte) where the config says so, else tokenizer.json, else byte."""
    from .chat_template import read_chat_template

    directory = Path(directory) if directory is not None else None
    cfg_path = directory / "tokenizer_config.json" if directory is not None else None
    cfg = json.loads(cfg_path.read_text()) if cfg_path is not None and cfg_path.exists() else None
    if cfg is not None and (cfg.get("dsarl_tokenizer") == "byte" or cfg.get("tokenizer_class") == "ByteTokenizer"):
        return ByteTokenizer(cfg.get("dsarl_special_tokens", cfg.get("special_tokens", SPECIAL_TOKENS)))
    if directory is not None and (directory / "tokenizer.json").exists():
        cfg = cfg or {}
        special = _special_from_hf_config(cfg, _read_json(directory / "special_tokens_map.json"))
        stop_ids, stop_strings = _stops_beside(directory, cfg)
        config = {k: v for k, v in cfg.items()
                  if k not in ("dsarl_special", "special", "chat_template", "dsarl_stop_strings")}
        return HFTokenizer(directory / "tokenizer.json", special, read_chat_template(directory, cfg), config,
                           stop_ids, stop_strings)
    return ByteTokenizer()


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat.

    A tokenizer with a Jinja `chat_template` (a Hugging Face tokenizer directory): the template's text,
    rendered as transformers renders it, tokenized without added special tokens (the template writes them),
    the ids AutoTokenizer.apply_chat_template gives. Otherwise dsarl's own format: bos, then
    <|role|> content <|end|> per message, then <|assistant|> to prompt a reply; built from ids (not by parsing
    special-token text), so user text can never inject a role marker.
    """
    from .chat_template import render_chat_template

    template = getattr(tokenizer, "chat_template", None)
    if template:
        text = render_chat_template(template, messages, add_generation_prompt, tokenizer.special_tokens_map())
        return tokenizer.encode(text)
    try:
        markers = {r: tokenizer.token_id(f"<|{r}|>") for r in (*ROLES, "end")}
    except KeyError:
        raise ValueError(f"{getattr(tokenizer, 'path', tokenizer)} has no chat_template (tokenizer_config.json or "
                         f"chat_template.jinja) and no <|user|>-style tokens: a chat prompt cannot be built; use "
                         f"data.prompt_format: raw with text prompts, or add a chat template") from None
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for m in messages:
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {role!r}")
        ids += [markers[role], *tokenizer.encode(m["content"]), markers["end"]]
    if add_generation_prompt:
        ids.append(markers["assistant"])
    return ids
