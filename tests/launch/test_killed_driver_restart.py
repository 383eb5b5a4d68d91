"""Issue #21 item 10: the Ray processes of a SIGKILLed run (dashboard agent, runtime-env agent, ...)
outlive its driver for a while, holding their ports; a run restarted at once with --resume must not
collide with them, and continues without losing or repeating a step."""
import json
import os
import signal
import time

import pytest
import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
import psutil

from cli_runs import start_cli, write_tiny_run


@pytest.mark.slow
def test_a_run_restarted_right_after_its_driver_was_killed_resumes_beside_the_leftovers(tmp_path):
    steps = 6
    config = write_tiny_run(tmp_path, steps=steps, extra="save_every: 1")
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = start_cli("grpo", str(config))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:  # kill once two steps are checkpointed
        if (tmp_path / "run" / "checkpoints" / "step_000002").exists():
            break
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()[0][-3000:]
    leftovers = [p for p in psutil.Process(first.pid).children(recursive=True)]
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    alive = [p for p in leftovers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive, "nothing of the killed run's Ray outlived its driver: the test would not test a collision"

    second = start_cli("grpo", str(config), "--resume")
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(0, steps + 1))  # 0: the eval before training, [r["step"] for r in rows]
    for p in alive:  # the test's own leftovers go
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
