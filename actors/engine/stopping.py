"""When a sequence ends: eos / stop token ids, stop strings, token and cache limits.

Stop strings are matched on decoded text after every token, over a tail window of tokens long enough
to hold any stop string (a character is at most 4 byte-level tokens), so a sequence ends on exactly
the token that completes the first occurrence. That token stays in `token_ids` (the learner trains on
what was sampled); the text is cut before the stop string, as vLLM does by default.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class StopRule:
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    max_new_tokens: int
    window: int  # tokens decoded to look for a stop string

    @classmethod
    def build(cls, params, eos_ids: int | tuple[int, ...] | None,
              tokenizer_stop_strings: tuple[str, ...] = ()) -> "StopRule":
        """eos_ids: the tokenizer's end ids (a chat model ends a turn with a token other than eos) and
        tokenizer_stop_strings (generation_config.json's) apply unless ignore_eos."""
        ids, strings = set(params.stop_token_ids), list(params.stop_strings)
        if eos_ids is not None and not params.ignore_eos:
            ids.update([eos_ids] if isinstance(eos_ids, int) else eos_ids)
            strings += tokenizer_stop_strings
        strings = tuple(dict.fromkeys(strings))
        longest = max((len(s) for s in strings), default=0)
        return cls(frozenset(ids), strings, params.max_new_tokens, 4 * longest + 4)

    def finish_reason(self, token_ids: list[int], decode, room_left: bool) -> str | None:
        """'stop' | 'length' | None (continue), after token_ids[-1] was appended."""
        if token_ids[-1] in self.stop_ids:
            return "stop"
        if self.stop_strings:
            tail = decode(token_ids[-self.window:])
            if any(s in tail for s in self.stop_strings):
                return "stop"
        if len(token_ids) >= self.max_new_tokens or not room_left:
            return "length"
        return None


def cut_at_stop_string(text: str, stop_strings: tuple[str, ...]) -> str:
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(cuts)] if cuts else text
