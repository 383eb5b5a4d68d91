"""Code reward: run the row's unit tests against the completion's code in the sandbox.

The code is the last ```python fenced block of the completion (else the last fenced block, else
the whole completion). `row[tests_key]` is either
- a string of Python test code (asserts, or calls that raise on failure), appended to the solution
  and run once: score 1.0 when it exits cleanly, else 0.0; or
- a list of stdin/stdout cases `[{"input": "...", "output": "..."}, ...]` (or a JSON string of
  one): score = share of cases whose stdout equals the expected output (trailing whitespace of
  each line and trailing blank lines ignored).
Returns {"score", "passed", "timeout"}; a timeout or a crashed interpreter scores 0.0.
"""
from __future__ import annotations

import json
import re
from typing import Optional

from dsarl.rewards.sandbox import SandboxLimits, run_sandboxed
from dsarl.rewards.types import RewardSample

_FENCE = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else text


def _normalise_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip("\n").splitlines()).rstrip()


class CodeTests:
    """Reward: unit tests of `row[tests_key]` run against the completion; see the module docstring."""

    def __init__(self, tests_key: str = "tests", time_s: float = 5.0, memory_mb: int = 512,
                 max_processes: int = 4, preload: Optional[list] = None):
        self.tests_key = tests_key
        self.limits = SandboxLimits(time_s=time_s, memory_mb=memory_mb, max_processes=max_processes,
                                    preload=tuple(preload or ()))

    def __call__(self, sample: RewardSample) -> dict:
        tests = sample.row[self.tests_key]
        if isinstance(tests, str) and tests.lstrip().startswith("["):
            tests = json.loads(tests)
        code = extract_code(sample.completion)
        if isinstance(tests, str):
            result = run_sandboxed(code + "\n\n" + tests, [""], self.limits)
            passed = float(bool(result.cases) and result.cases[0]["ok"])
            return {"score": passed, "passed": passed, "timeout": float(result.status == "timeout")}
        if not tests:
            raise ValueError(f"code_tests: row[{self.tests_key!r}] has no test cases")
        result = run_sandboxed(code, [str(case["input"]) for case in tests], self.limits)
        passed = sum(1 for case, got in zip(tests, result.cases)
                     if got["ok"] and _normalise_output(got["stdout"]) == _normalise_output(str(case["output"])))
        share = passed / len(tests)
        return {"score": share, "passed": float(passed), "timeout": float(result.status == "timeout")}
