import math

import pytest
from hypothesis import given, settings, strategies as st

from dsarl.rewards.extract import final_answer, last_boxed, last_number, parse_number
from dsarl.rewards.rules import exact_match, format_tags, json_schema, math_answer, regex_match
from dsarl.rewards.types import RewardSample


def S(completion, **row):
    return RewardSample(prompt="q", completion=completion, num_tokens=len(completion.split()), row=row)


@pytest.mark.parametrize("completion,answer,expected", [
    (r"so the result is \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("Half of it: 1/2", "0.5", 1.0),
    ("The length is 12 cm.", "12", 1.0),
    (r"\boxed{12\text{ cm}}", "12", 1.0),
    ("We get 1,000 apples in total, done.", "1000", 1.0),
    (r"\boxed{50\%}", "0.5", 1.0),
    (r"\boxed{x^2+2x}", "x(x+2)", 1.0),
    (r"\boxed{\sqrt{2}}", r"\sqrt 2", 1.0),
    (r"reference boxed: \boxed{7}", r"the answer is \boxed{7}", 1.0),
    # wrong
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
    ("The answer is 13 cm.", "12", 0.0),
    (r"\boxed{3x}", "3", 0.0),
    (r"first 4, then \boxed{5}", "4", 0.0),
    ("it is 12 and then 13", "12", 0.0),
    # malformed
    (r"\boxed{", "3", 0.0),
    ("", "3", 0.0),
    ("no numbers here at all", "3", 0.0),
    (r"\boxed{}", "0", 0.0),
])
def test_math_answer(completion, answer, expected):
    assert math_answer(S(completion, answer=answer)) == expected


@pytest.mark.parametrize("completion,answer,expected", [
    (r"\boxed{1000001}", "1000000", 0.0),  # within 1e-6 relative, but integers compare exactly
    ("there are 1,000,001 of them", "1000000", 0.0),
    ("12345678901234567891", "12345678901234567890", 0.0),  # beyond float precision
    (r"\boxed{1000000}", "1,000,000", 1.0),
    (r"\boxed{3.0}", "3", 1.0),  # an integer written with a decimal point
    (r"\boxed{1000000.5}", "1000000", 1.0),  # a non-integer side keeps the relative tolerance
    (r"\boxed{0.3333333}", r"\frac{1}{3}", 1.0),
])
def test_integers_compare_exactly(completion, answer, expected):
    assert math_answer(S(completion, answer=answer)) == expected


def test_math_answer_unclosed_box_falls_back_to_last_number():
    assert math_answer(S(r"it is 8 so \boxed{8", answer="8")) == 1.0


@pytest.mark.parametrize("text,boxed,number", [
    (r"a \boxed{1} b \boxed{\frac{2}{3}} c", r"\frac{2}{3}", "3"),
    (r"\boxed{a{b}c}", "a{b}c", None),
    ("x = -3.5e2 and 7/8.", None, "7/8"),
    ("1,234,567 items", None, "1,234,567"),
    ("", None, None),
])
def test_extractors(text, boxed, number):
    assert last_boxed(text) == boxed
    assert last_number(text) == number


@pytest.mark.parametrize("s,value", [
    ("0.5", 0.5), ("1/2", 0.5), (r"\frac{1}{2}", 0.5), (r"\dfrac{3}{4}", 0.75), ("50%", 0.5),
    ("12 cm", 12.0), (r"\$3.00", 3.0), ("-7", -7.0), ("2,500", 2500.0), ("(5)", 5.0),
    ("x+1", None), ("3x", None), (r"\frac{a}{2}", None), ("1/0", None), ("12 apples and more", None),
])
def test_parse_number(s, value):
    got = parse_number(s)
    assert got == value if value is None else math.isclose(got, value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}frac0123456789.,/-+eE% $abcx()[]\n")), max_size=60)
       | st.text(max_size=60))
def test_extractors_never_raise(text):
    for fn in (last_boxed, last_number, final_answer):
        out = fn(text)
        assert out is None or isinstance(out, str)
    value = parse_number(text)
    assert value is None or isinstance(value, float)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}frac0123456789.,/-x^ ")), max_size=30))
def test_math_answer_never_raises(text):
    assert math_answer(S(text, answer=r"\frac{1}{2}")) in (0.0, 1.0)


def test_exact_and_regex():
    assert exact_match(S("The capital is Paris", answer="paris")) == 0.0  # no number, no box
    assert exact_match(S(r"\boxed{Paris}", answer="paris")) == 1.0
    assert exact_match(S(r"\boxed{Paris}", answer="paris"), case_sensitive=True) == 0.0
    assert exact_match(S("The capital is  Paris ", answer="the capital is paris"), extract=False) == 1.0
    assert regex_match(S("Answer: 42"), pattern=r"Answer:\s*\d+$") == 1.0
    assert regex_match(S("Answer: 42 maybe"), pattern=r"Answer:\s*\d+$") == 0.0
    with pytest.raises(KeyError, match="answer"):  # a missing column is a config error, not a 0
        regex_match(S("Final: a+b"), pattern=r"Final: {answer}$", answer_key="answer")
    assert regex_match(S("Final: a-b", answer="a+b"), pattern=r"Final: {answer}$", answer_key="answer") == 0.0
    assert regex_match(S("Final: a+b", answer="a+b"), pattern=r"Final: {answer}$", answer_key="answer") == 1.0


@pytest.mark.parametrize("completion,expected", [
    ("<think>hm</think><answer>4</answer>", 1.0),
    ("<think>\nmulti\nline\n</think>\n<answer>4</answer> trailing", 1.0),
    ("<answer>4</answer><think>hm</think>", 0.0),  # wrong order
    ("<think>hm</think>", 0.0),  # missing tag
    ("<think>a</think><think>b</think><answer>4</answer>", 0.0),  # duplicated
    ("<think>hm<answer>4</answer>", 0.0),  # unclosed
])
def test_format_tags(completion, expected):
    assert format_tags(S(completion), tags=("think", "answer")) == expected


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("completion,expected", [
    ('{"name": "Ada", "age": 36}', 1.0),
    ('Here you go:\n```json\n{"name": "Ada", "age": 36}\n```\nDone.', 1.0),
    ('Sure! {"name": "Ada", "age": 36} hope it helps', 1.0),
    ('{"name": "Ada", "age": "36"}', 0.0),  # wrong type
    ('{"name": "Ada"}', 0.0),  # missing key
    ('{"name": "Ada", "age": 36, "x": 1}', 0.0),  # extra key
    ('{"name": "Ada", "age": 36', 0.0),  # malformed
    ("", 0.0),
])
def test_json_schema(completion, expected):
    assert json_schema(S(completion), schema=SCHEMA) == expected
    import json
    assert json_schema(S(completion, schema=json.dumps(SCHEMA))) == expected
