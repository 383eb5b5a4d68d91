import subprocess
import sys

import pytest

from dsarl.rewards.language import LanguageConsistency, language_share, load_identifier, split_sentences
from dsarl.rewards.length import LengthShaping, overlong_penalty, shortest_correct_shaping
from dsarl.rewards.types import RewardSample

EN = "The cat sat on the mat. It was very happy. Then it slept all day long."
DE = "Die Katze saß auf der Matte. Sie war sehr glücklich. Dann schlief sie den ganzen Tag."
ZH = "猫坐在垫子上。它非常高兴。然后它睡了一整天。"


@pytest.mark.parametrize("backend", ["langid", "fasttext"])
@pytest.mark.parametrize("text,target,share", [(EN, "en", 1.0), (DE, "de", 1.0), (EN, "de", 0.0), (DE, "en", 0.0)])
def test_share_single_language(backend, text, target, share):
    assert language_share(text, target, load_identifier(backend)) == pytest.approx(share)


def test_share_chinese():
    ident = load_identifier("langid")
    assert language_share(ZH, "zh", ident) == pytest.approx(1.0)
    assert language_share(ZH, "en", ident) == pytest.approx(0.0)


def test_share_mixed_is_letter_weighted():
    ident = load_identifier("langid")
    # "The cat sat on the mat." has 17 letters; the German sentence has 34.
    text = "The cat sat on the mat. Die Katze war sehr glücklich und schlief."
    assert language_share(text, "en", ident) == pytest.approx(17 / 51)
    # "First we add the numbers." has 20 letters, the Chinese sentence 10 characters.
    text = "First we add the numbers. 我们先把两个数加起来。"
    assert language_share(text, "zh", ident) == pytest.approx(10 / 30)


def test_formulas_and_code_are_neutral():
    ident = load_identifier("langid")
    text = "Die Summe ist klar. $x^2 + y^2 = z^2$\n```python\nprint('hello world in english')\n```\n42"
    assert split_sentences(text) == ["Die Summe ist klar.", "42"]
    assert language_share(text, "de", ident) == pytest.approx(1.0)
    assert language_share("12 + 30 = 42", "de", ident) == 1.0


def test_reward_uses_row_language_then_target():
    r = LanguageConsistency(target="en")
    out = r(RewardSample("q", DE, 10, {"language": "de"}))
    assert out == {"score": pytest.approx(0.0), "share": pytest.approx(1.0)}
    assert r(RewardSample("q", DE, 10, {}))["score"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="language"):
        LanguageConsistency()(RewardSample("q", DE, 10, {}))


def test_language_id_needs_no_network():
    """Both backends load and classify with sockets disabled in a fresh interpreter."""
    code = (
        "import socket\n"
        "def no_net(*a, **k): raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = no_net\nsocket.create_connection = no_net\nsocket.getaddrinfo = no_net\n"
        "from dsarl.rewards.language import load_identifier\n"
        "print(load_identifier('langid')('Das ist ein Satz.'), load_identifier('fasttext')('Das ist ein Satz.'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"FTLANG_CACHE": "/nonexistent/cache", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["de", "de"]


@pytest.mark.parametrize("n,expected", [(0, 0.0), (80, 0.0), (85, -0.25), (90, -0.5), (100, -1.0), (150, -1.0)])
def test_overlong(n, expected):
    s = RewardSample("q", "x", n, {})
    assert overlong_penalty(s, max_len=100, buffer=20) == pytest.approx(expected)


def test_overlong_rejects_bad_buffer():
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(RewardSample("q", "x", 1, {}), max_len=10, buffer=20)


def test_shortest_correct_shaping():
    # shortest correct = 100: 150 -> -0.5, 300 -> capped -1, wrong ones untouched
    assert shortest_correct_shaping([100, 150, 300, 50], [True, True, True, False]) == [0.0, -0.5, -1.0, 0.0]
    assert shortest_correct_shaping([10, 20], [False, False]) == [0.0, 0.0]
    assert shortest_correct_shaping([100, 150], [True, True], scale=2.0) == [0.0, -0.25]


def test_length_shaping_group_reward():
    rows = {"answer": "4"}
    group = [RewardSample("q", r"\boxed{4}", 40, rows), RewardSample("q", r"long... \boxed{4}", 60, rows),
             RewardSample("q", r"\boxed{5}", 10, rows)]
    assert LengthShaping()(group) == [0.0, -0.5, 0.0]
