"""Code reward: run the row's unit tests against the completion's code in the sandbox.

The code is the last ```python fenced block of the completion (else the last fenced block, else
the whole completion). `row[tests_key]` is either
- a string of Python test code (asserts, or calls that raise on failure), appended to the solution
  and run once: score 1.0 when it exits cleanly, else 0.0; or
- a list of stdin/stdout cases `[{"input": "...", "output": "..."}, ...]` (or a JSON string of
  one): score = share of cases whose stdout equals the expected output (trailing whitespace of
  each line and trailing blank lines ignored).
Returns {"score", "passed", "timeout"}; a timeout or a crashed interpreter scores 0.0.

Results are cached by (code, tests): a GRPO group's samples converge on the same program, and the
same prompt comes back every epoch, so most sandbox starts (~0.2 s each) are repeats. Programs whose
outcome is not a function of their text (time, randomness) should set `cache_size: 0`.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
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
                 max_processes: int = 4, preload: Optional[list] = None, cache_size: int = 4096):
        self.tests_key = tests_key
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict] = OrderedDict()  # LRU: key of (code, tests) -> result
        self.limits = SandboxLimits(time_s=time_s, memory_mb=memory_mb, max_processes=max_processes,
                                    preload=tuple(preload or ()))

    def __call__(self, sample: RewardSample) -> dict:
        tests = sample.row[self.tests_key]
        code = extract_code(sample.completion)
        if self.cache_size <= 0:
            return self._run(code, tests)
        key = hashlib.sha256(json.dumps([code, tests]).encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return dict(self._cache[key])
        result = self._run(code, tests)
        if not result["timeout"]:  # a timeout may be the machine's load, not the program: run it again next time
            self._cache[key] = dict(result)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def _run(self, code: str, tests) -> dict:
        if isinstance(tests, str) and tests.lstrip().startswith("["):
            tests = json.loads(tests)
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
