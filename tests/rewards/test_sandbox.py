"""The code sandbox on hostile programs. Each must be contained and leave nothing behind."""
import os
import socket
import threading
from pathlib import Path

import pytest

from dsarl.rewards.code import CodeTests, extract_code
from dsarl.rewards.sandbox import SandboxLimits, live_pids_of_uid, run_sandboxed
from dsarl.rewards.types import RewardSample

FAST = SandboxLimits(time_s=3.0, memory_mb=256)
NO_HOOKS = SandboxLimits(time_s=3.0, memory_mb=256, audit_hooks=False, preload=("socket",))
ROOT = os.geteuid() == 0


def S(completion, tests):
    return RewardSample(prompt="write add", completion=completion, num_tokens=10, row={"tests": tests})


def assert_clean(result):
    if result.uid is not None:
        assert live_pids_of_uid(result.uid) == []


def test_correct_and_wrong_solutions_assert_tests():
    reward = CodeTests(time_s=5)
    good = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
    assert reward(S(good, tests))["score"] == 1.0
    assert reward(S(bad, tests))["score"] == 0.0
    assert reward(S("def add(a, b) return a+b", tests))["score"] == 0.0  # syntax error


def test_stdin_stdout_cases_score_the_share_passed():
    code = "```py\na, b = map(int, input().split())\nprint(a * b)\n```"
    cases = [{"input": "2 3", "output": "6"}, {"input": "4 5", "output": "20\n"}, {"input": "1 1", "output": "2"}]
    out = CodeTests(time_s=5)(S(code, cases))
    assert out["score"] == pytest.approx(2 / 3) and out["passed"] == 2.0


def test_extract_code_prefers_last_python_block():
    text = "```bash\nls\n```\n```python\nx = 1\n```\n```python\nx = 2\n```"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("print(1)") == "print(1)"


def test_infinite_loop_times_out():
    r = run_sandboxed("while True:\n    pass\n", [""], SandboxLimits(time_s=1.0))
    assert r.status == "timeout" and r.cases == []
    assert_clean(r)


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC binds only after the switch to an unprivileged uid")
@pytest.mark.parametrize("limits", [FAST, NO_HOOKS], ids=["hooks", "os-limits-only"])
def test_fork_bomb_is_contained(limits):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_sandboxed(bomb, [""], SandboxLimits(**{**limits.__dict__, "time_s": 1.5, "max_processes": 3}))
    assert not (r.cases and r.cases[0]["ok"])
    assert_clean(r)  # every process of the sandbox uid is gone


def test_fork_bomb_blocked_by_hooks_reports_error():
    r = run_sandboxed("import os\nos.fork()\n", [""], FAST)
    assert r.cases and not r.cases[0]["ok"] and "os.fork" in r.cases[0]["error"]


def test_memory_hog_fails_with_memory_error():
    r = run_sandboxed("x = bytearray(2 * 1024**3)\n", [""], FAST)
    assert r.status == "ok" and not r.cases[0]["ok"] and "MemoryError" in r.cases[0]["error"]


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    accepted = []

    def serve():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.mark.parametrize("limits", [FAST, NO_HOOKS], ids=["hooks", "namespace-only"])
def test_socket_connection_is_refused(listener, limits):
    if limits is NO_HOOKS and not ROOT:
        pytest.skip("the network namespace needs root")
    port, accepted = listener
    code = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')\n"
    r = run_sandboxed(code, [""], limits)
    assert r.cases and not r.cases[0]["ok"] and "connected" not in r.cases[0]["stdout"]
    assert accepted == []


@pytest.mark.parametrize("limits", [FAST, NO_HOOKS], ids=["hooks", "os-limits-only"])
def test_write_outside_directory_does_not_reach_host(tmp_path, limits):
    if limits is NO_HOOKS and not ROOT:
        pytest.skip("uid switch and mount namespace need root")
    targets = [tmp_path / "escape.txt", Path("/tmp") / f"dsarl-escape-{os.getpid()}.txt",
               Path("/var/tmp") / f"dsarl-escape-{os.getpid()}.txt"]
    code = "import os\nopen('inside.txt', 'w').write('ok')\nassert os.path.exists('inside.txt')\n"
    code += "".join(f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets)
    r = run_sandboxed(code, [""], limits)
    assert r.cases and r.cases[0]["ok"], r  # writing inside its own directory works
    for t in targets:
        assert not t.exists(), t
    assert_clean(r)


def test_output_is_capped():
    r = run_sandboxed("print('x' * 10_000_000)\n", [""], SandboxLimits(time_s=3.0, max_output_chars=1000))
    assert r.cases[0]["truncated"] and len(r.cases[0]["stdout"]) == 1000


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("DSARL_SECRET", "hunter2")
    r = run_sandboxed("import os\nprint(os.environ.get('DSARL_SECRET'))\n", [""], FAST)
    assert r.cases[0]["stdout"].strip() == "None"


def test_code_results_are_cached_by_code_and_tests(monkeypatch):
    """A repeated (code, tests) pair is scored from the cache with the result of a real run; a new
    program, new tests, or cache_size 0 start the sandbox again."""
    import dsarl.rewards.code as code_mod

    starts = []
    real = code_mod.run_sandboxed
    monkeypatch.setattr(code_mod, "run_sandboxed", lambda *a, **k: starts.append(1) or real(*a, **k))
    tests = "assert add(1, 2) == 3\n"
    good, bad = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a * b\n"
    reward = CodeTests(time_s=5)
    first = [reward(S(c, tests))["score"] for c in (good, bad, good, bad, f"```python\n{good}```")]
    assert first == [1.0, 0.0, 1.0, 0.0, 1.0] and len(starts) == 2  # the fenced copy extracts to `good`
    assert reward(S(good, tests + "assert add(2, 2) == 4\n"))["score"] == 1.0 and len(starts) == 3
    uncached = CodeTests(time_s=5, cache_size=0)
    assert [uncached(S(good, tests))["score"] for _ in range(2)] == [1.0, 1.0] and len(starts) == 5
    small = CodeTests(time_s=5, cache_size=1)  # LRU of one: alternating programs always miss
    assert [small(S(c, tests))["score"] for c in (good, bad, good)] == [1.0, 0.0, 1.0] and len(starts) == 8
