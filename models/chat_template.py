"""A tokenizer directory's Jinja chat template: where it is stored, and rendering it as transformers does.

A Hugging Face tokenizer keeps its template in one of three places (newest first): `chat_template.jinja`
(transformers v5 saves it there), `chat_template.json` ({"chat_template": ...}, processors), or the
`chat_template` key of `tokenizer_config.json`, which may also be a list of named templates
([{"name": "default", "template": ...}, {"name": "tool_use", ...}]; "default" is the one used).

Rendering is transformers' own (`render_jinja_template`: a sandboxed Jinja environment with its
`raise_exception`, `strftime_now`, `tojson` and `{% generation %}`), given the special tokens as
`bos_token`, `eos_token`, ... exactly as `PreTrainedTokenizerBase.apply_chat_template` passes them, so the
text is the same; the caller tokenizes it without adding special tokens (the template writes them).
"""
import json
from pathlib import Path


def read_chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    """The directory's default chat template, or None when it has none."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = directory / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text()).get("chat_template")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates
        named = {t["name"]: t["template"] for t in template}
        if "default" not in named:
            raise ValueError(f"{directory / 'tokenizer_config.json'}: chat_template lists {sorted(named)} but no "
                             f"'default' template")
        return named["default"]
    return template


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         special_tokens: dict[str, str]) -> str:
    """The chat as text. special_tokens: {"bos_token": "<s>", "eos_token": ...} as the template sees them."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **special_tokens)
    return rendered[0]
