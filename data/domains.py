"""Domains for specialist distillation: a task generator, a reward mix and an accuracy component each.

    math       `37+58=` -> `95`                      rule reward (math_answer) + format + length
    code       `f(x)=5x+37` -> `f=lambda x:5*x+37`     executed in the sandbox against hidden
                                                     points (code_tests) + format + length
    retrieval  `qwe K3 rty ... Q7 ...\n?K` -> `3`      exact match (passkey: attention must find the
                                                     needle K among 4; copying any digit seen
                                                     scores ~1/4, looking it up scores 1)

`DOMAINS` is the registry; `Domain.grpo_fields()` is what a specialist's GRPO config takes from it.
Importing this module also registers two tasks in `dsarl.data.tasks`: `code_lambda` (the code
domain's generator) and `mixed` (documents drawn from several domains, for pretraining one base on
all of them).
"""
import random
from dataclasses import dataclass, field, replace
from typing import Any

from dsarl.rewards.config import RewardComponentConfig

from .tasks import TASKS, get_task, register_task


@register_task("code_lambda")
def code_lambda(rng: random.Random, min_slope: int = 2, max_slope: int = 9, max_intercept: int = 99,
                given: str = "points") -> dict:
    """A line -> a Python lambda for it; checked on the given and a hidden point.

    given `points`: `f(0)=37 f(1)=42` (the slope must be worked out); `formula`: `f(x)=5x+37` (a
    translation into Python). The answer is one of many programs that pass (`x*5+37`, `37+5*x` ...
    count too): the reward runs the completion, it never compares text.
    """
    a = rng.randint(min_slope, max_slope)
    b = rng.randint(0, max_intercept)
    x = rng.randint(2, 9)
    if given not in ("points", "formula"):
        raise ValueError(f"code_lambda: given must be 'points' or 'formula', got {given!r}")
    prompt = f"f(0)={b} f(1)={a + b}\n" if given == "points" else f"f(x)={a}x+{b}\n"
    return {"prompt": prompt, "answer": f"f=lambda x:{a}*x+{b}",
            "tests": f"assert f(0)=={b} and f(1)=={a + b} and f({x})=={a * x + b}",
            "task": "code_lambda", "language": "en"}


@dataclass(frozen=True)
class Domain:
    name: str
    task: str  # a generator in dsarl.data.tasks
    task_kwargs: dict[str, Any]
    rewards: tuple[RewardComponentConfig, ...]  # the reward mix, summed into "total"
    accuracy_component: str  # the reward component whose value > 0.5 counts as correct
    max_new_tokens: int  # generation budget: the longest answer, a newline and eos fit, and the
    # length penalty (which counts those tokens too) starts only beyond them
    reward_timeout_s: float = 5.0
    # what pretraining on the domain reads (data/retrieval_docs.py DOCUMENTS, the task's kwargs); None:
    # the task's rows. A passkey row holds one answer token in ~70; its multi-query document asks
    # every needle (the first query reads like the row's prompt): four times the retrieval signal.
    pretrain_document: str | None = None
    pretrain_kwargs: dict[str, Any] = field(default_factory=dict)  # the document's own kwargs, beside the task's

    def pretrain_part(self, weight: float = 1.0, task_kwargs: dict | None = None) -> dict:
        """This domain as a part of a `mixture` pretraining task (data/retrieval_docs.py)."""
        return {"document": self.pretrain_document or self.task, "weight": float(weight),
                "kwargs": {**self.task_kwargs, **(task_kwargs or {}), **self.pretrain_kwargs}}

    def grpo_fields(self, task_kwargs: dict | None = None) -> dict:
        """The GRPOConfig fields this domain sets (data, rewards, accuracy, generation length)."""
        return {"task": self.task, "task_kwargs": {**self.task_kwargs, **(task_kwargs or {})},
                "components": [replace(c, kwargs=dict(c.kwargs)) for c in self.rewards],  # every field kept
                "accuracy_component": self.accuracy_component, "max_new_tokens": self.max_new_tokens,
                "timeout_s": self.reward_timeout_s}


def _format(pattern: str) -> RewardComponentConfig:
    return RewardComponentConfig(name="regex_match", label="format", weight=0.1,
                                 kwargs={"pattern": pattern, "fullmatch": True})


def _length(max_len: int, buffer: int) -> RewardComponentConfig:
    return RewardComponentConfig(name="overlong", label="length", weight=0.5,
                                 kwargs={"max_len": max_len, "buffer": buffer})


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("math", "arithmetic", {"min_digits": 1, "max_digits": 2, "ops": "+-"},
           (RewardComponentConfig(name="math_answer"), _format(r"-?\d+"), _length(10, 4)),
           accuracy_component="math_answer", max_new_tokens=10),
    Domain("code", "code_lambda", {"given": "formula"},
           (RewardComponentConfig(name="code_tests", kwargs={"time_s": 5.0}), _format(r"f=lambda x:.+"),
            _length(26, 4)),
           accuracy_component="code_tests", max_new_tokens=26),
    Domain("retrieval", "passkey", {"context_len": 64, "n_needles": 4, "value_len": 1},
           (RewardComponentConfig(name="exact_match", kwargs={"extract": False}), _length(6, 2)),
           accuracy_component="exact_match", max_new_tokens=6,
           pretrain_document="passkey_multi_query", pretrain_kwargs={"min_queries": 1}),
)}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; registered: {sorted(DOMAINS)}")
    return DOMAINS[name]


@register_task("mixed")
def mixed(rng: random.Random, domains: dict[str, dict] | None = None, weights: dict[str, float] | None = None) -> dict:
    """A row of one domain, drawn by `weights` (default uniform). `domains` maps each domain name to
    task-kwargs overrides of the registry's (default: every registered domain, as registered)."""
    names = sorted(domains) if domains else sorted(DOMAINS)
    w = [float((weights or {}).get(n, 1.0)) for n in names]
    name = rng.choices(names, weights=w)[0]
    d = get_domain(name)
    row = TASKS[d.task](rng, **{**d.task_kwargs, **((domains or {}).get(name) or {})})
    return {**row, "domain": name}


@dataclass(frozen=True)
class DomainRows:
    """A domain's prompt rows in three disjoint splits: train (specialist GRPO, SFT data, on-policy
    prompts), validation (every choice the distillation makes) and held out (the report only)."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]

    def __post_init__(self):
        assert_disjoint(self.train, self.validation, self.test)


def assert_disjoint(train: list[dict], validation: list[dict], test: list[dict]) -> None:
    """No prompt text in two splits: a validation row seen in training would flatter the student the
    choices favour, one shared with the held-out rows would let a choice read the report's rows."""
    for a_name, a, b_name, b in (("train", train, "validation", validation), ("train", train, "test", test),
                                 ("validation", validation, "test", test)):
        shared = {str(r["prompt"]) for r in a} & {str(r["prompt"]) for r in b}
        assert not shared, f"{len(shared)} prompt(s) in both {a_name} and {b_name}, e.g. {sorted(shared)[0]!r}"


def validation_rows(task: str, task_kwargs: dict, n: int, seed: int, exclude: list[dict]) -> list[dict]:
    """`n` rows of the task's own `validation` split (ids `<task>-validation-<i>`) whose prompts are in
    none of `exclude` (train and held-out rows): a small task (2-digit sums) repeats prompts across
    splits, so rows are drawn past n until n disjoint ones are found."""
    if n < 0:
        raise ValueError(f"validation size must be >= 0, got {n}")
    seen = {str(r["prompt"]) for r in exclude}
    out, i, gen = [], 0, get_task(task)
    while len(out) < n:
        if i >= 20 * n + 1000:
            raise ValueError(f"task {task!r} {task_kwargs}: only {len(out)} of {n} validation prompts differ from "
                             f"the {len(exclude)} train and held-out rows after {i} draws; use fewer rows")
        row = gen(random.Random(f"{seed}/validation/{task}/{i}"), **task_kwargs)  # make_rows' seeding, own split
        row["id"] = f"{task}-validation-{i}"
        i += 1
        if str(row["prompt"]) not in seen:  # repeats inside validation kept: drawn as the held-out rows are
            out.append(row)
    return out
