"""Dataset rows as prompts: the prompt column (text or a chat), the reference answer, and everything else kept.

A row's prompt is `row[prompt_key]`: a string, or a chat, a list of {role, content} messages. A chat that
ends with an assistant message (a `messages` SFT file) is a prompt and its reference: the prompt is the chat
before that message and, when no answer_key is given, the message's content is the answer.

Out, per row: every column unchanged, plus `prompt` (the text or the messages the policy is prompted with)
and, where there is one, `answer` (the reference reward functions read by default: `answer_key: answer`);
these two are set even where the row had columns of those names (prompt_key / answer_key name the source).
Reward functions see the whole row as `sample.row`, so any other column reaches them by its own name.
Checked per row, each error naming the source and the row: a prompt that is null, neither a string nor a
chat, a chat message whose content is not a string, and text that is not valid Unicode (a lone surrogate).
`load_prompts` is the one reader of a prompt dataset: the GRPO driver and the pre-start checks both call it.
"""
from .datasets import load_rows, local_or_name


def check_text(text: str, where: str) -> str:
    """`text` as valid Unicode: a lone surrogate (JSON's "\ud800" escape decodes to one) cannot be encoded,
    so the tokenizer would raise mid-run, at the step that first samples the row; raises ValueError naming `where`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: not valid Unicode text: a lone surrogate U+{ord(text[e.start]):04X} at character "
                         f"{e.start} (a JSON \\u{ord(text[e.start]):04x} escape with no pair?)") from None
    return text


def check_messages(messages, where: str = "messages") -> list[dict]:
    """A chat as a non-empty list of {role, content} dicts with string content; raises ValueError naming `where`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages, got {messages!r:.200}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"{where}[{i}]: expected a {{role, content}} message, got {m!r:.200}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}[{i}]['content']: expected a string, got {m['content']!r:.200}")
        check_text(m["content"], f"{where}[{i}]['content']")
    return list(messages)


def split_reference(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(the prompt messages, the final assistant reply or None)."""
    if messages[-1]["role"] == "assistant" and len(messages) > 1:
        return messages[:-1], messages[-1]["content"]
    return messages, None


def prompt_row(row: dict, prompt_key: str, answer_key: str | None, where: str) -> dict:
    if prompt_key not in row:
        raise ValueError(f"{where}: no {prompt_key!r} column (data.prompt_key; columns: {sorted(row)})")
    if answer_key is not None and answer_key not in row:
        raise ValueError(f"{where}: no {answer_key!r} column (data.answer_key; columns: {sorted(row)})")
    prompt, reference = row[prompt_key], None
    if prompt is None:
        raise ValueError(f"{where}: the prompt ({prompt_key!r}, data.prompt_key) is null")
    if isinstance(prompt, str):
        check_text(prompt, f"{where}[{prompt_key!r}]")
    elif isinstance(prompt, (list, tuple)):
        prompt, reference = split_reference(check_messages(prompt, f"{where}[{prompt_key!r}]"))
    else:
        raise ValueError(f"{where}[{prompt_key!r}]: expected a string or a list of {{role, content}} messages, "
                         f"got {type(prompt).__name__} {prompt!r:.200}")
    out = {**row, "prompt": prompt}
    if answer_key is not None:
        out["answer"] = row[answer_key]
        if isinstance(out["answer"], str):
            check_text(out["answer"], f"{where}[{answer_key!r}]")
    elif reference is not None and "answer" not in row:
        out["answer"] = reference
    return out


def prompt_rows(rows: list[dict], prompt_key: str = "prompt", answer_key: str | None = None,
                source: str = "data") -> list[dict]:
    """Rows with `prompt` (and `answer`) set from the named columns; raises ValueError naming the row and column."""
    return [prompt_row(r, prompt_key, answer_key, f"{source}: row {i}") for i, r in enumerate(rows)]


def load_prompts(source: str, resolve=lambda p: p, prompt_key: str = "prompt", answer_key: str | None = None,
                 split: str | None = "train", limit: int | None = None, subset: str | None = None) -> list[dict]:
    """prompt_rows of load_rows(source): `source` resolved (config-relative) where such a path exists, else taken
    as a `datasets` name."""
    return prompt_rows(load_rows(local_or_name(source, resolve), split, limit, subset), prompt_key, answer_key, source)
