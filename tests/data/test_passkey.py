"""Passkey retrieval rows and documents, repeat-copy documents and document mixtures: every answer is
checked against the haystack it came from, parsed back from the text."""
import random
import re
import string
from collections import Counter

import pytest

from dsarl.data.retrieval_docs import document_segments, mixture, passkey_multi_query, repeat_copy
from dsarl.data.tasks import make_rows, passkey_haystack

NEEDLE = re.compile(r"([A-Z])(\d+)")


def parse_needles(text: str) -> dict[str, str]:
    found = NEEDLE.findall(text)
    keys = [k for k, _ in found]
    assert len(keys) == len(set(keys)), "every key is stated once"
    return dict(found)


@pytest.mark.parametrize("context_len,n_needles", [(40, 1), (300, 8), (2000, 26), (10, 12)])
def test_haystack_holds_each_needle_once_in_lowercase_filler(context_len, n_needles):
    text, keys, values = passkey_haystack(random.Random(context_len + n_needles), context_len, n_needles, 3)
    assert parse_needles(text) == dict(zip(keys, values)) and len(set(keys)) == n_needles
    words = text.split(" ")
    filler = [w for w in words if not NEEDLE.fullmatch(w)]
    assert len(filler) == len(words) - n_needles
    assert all(w and set(w) <= set(string.ascii_lowercase) for w in filler)
    assert len(" ".join(filler)) >= context_len - 1  # the filler alone reaches the asked length


def test_passkey_row_asks_one_needle_and_its_value_is_the_answer():
    for row in make_rows("passkey", 30, seed=3, context_len=200, n_needles=5, value_len=2):
        text, query = row["prompt"].rsplit("\n?", 1)
        needles = parse_needles(text)
        assert len(needles) == 5 and query in needles and row["answer"] == needles[query]
        assert 0.0 <= row["needle_depth"] < 1.0
    depths = [r["needle_depth"] for r in make_rows("passkey", 200, seed=0, context_len=400, n_needles=1)]
    assert min(depths) < 0.1 and max(depths) > 0.9  # needles at every depth
    with pytest.raises(ValueError, match="n_needles"):
        make_rows("passkey", 1, 0, n_needles=27)


def test_passkey_document_asks_every_needle_once_and_reads_like_the_eval_prompt():
    segs = passkey_multi_query(random.Random(5), context_len=150, n_needles=6, value_len=2)
    needles = parse_needles(segs[0][0])
    queries = segs[1:-1]
    asked = [q[2:] for q, _ in queries[::2]]
    assert sorted(asked) == sorted(needles) and segs[-1] == ("\n", False)
    for (q, q_ans), (v, v_ans) in zip(queries[::2], queries[1::2]):
        assert q.startswith("\n?") and not q_ans and v_ans and needles[q[2:]] == v
    assert "".join(t for t, _ in segs[:2]) == f"{segs[0][0]}\n?{asked[0]}"


def test_repeat_copy_answer_is_the_text_again():
    segs = repeat_copy(random.Random(1), length=100, min_length=20)
    (text, a), (nl, b), (copy, c), (end, d) = segs
    assert copy == text and (a, b, c, d) == (False, False, True, False) and nl == end == "\n"
    assert set(text) <= set(string.ascii_lowercase + " ")


def test_mixture_draws_parts_by_weight_with_their_kwargs():
    parts = {"repeat_copy": {"weight": 3, "kwargs": {"length": 30}},
             "passkey_multi_query": {"weight": 1, "kwargs": {"context_len": 30, "n_needles": 2}}}
    rng = random.Random(0)
    kinds = Counter("copy" if len(s) == 4 and s[2][1] else "passkey" for s in (mixture(rng, parts) for _ in range(800)))
    assert 0.70 < kinds["copy"] / 800 < 0.80  # 3:1
    assert document_segments("mixture", random.Random(2), {"parts": parts}) == mixture(random.Random(2), parts)
    with pytest.raises(ValueError, match="unknown task"):
        mixture(random.Random(0), {"nope": {}})


def test_word_filler_draws_from_the_word_list_and_keeps_the_needles():
    from dsarl.data.tasks import FILLER_WORDS

    text, keys, values = passkey_haystack(random.Random(9), 500, 10, 2, filler="words")
    assert parse_needles(text) == dict(zip(keys, values))
    filler = [w for w in text.split(" ") if not NEEDLE.fullmatch(w)]
    assert set(filler) <= set(FILLER_WORDS) and len(set(filler)) > 20
    with pytest.raises(ValueError, match="filler"):
        passkey_haystack(random.Random(0), 50, 2, 2, filler="prose")
