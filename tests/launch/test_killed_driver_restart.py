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
    # The first run must still be running when the test kills it: a tiny step takes 0.2 s, so once step 2 is
    # checkpointed a reward plug-in holds every later sample while the test's hold file exists (the resumed
    # run, started after the file is gone, runs at full speed).
    hold, gate = tmp_path / "hold", tmp_path / "run" / "checkpoints" / "step_000002"
    hold.touch()
    (tmp_path / "holding.py").write_text(
        "import os, time\n"
        "def hold(sample, hold, gate):\n"
        "    while os.path.exists(hold) and os.path.exists(gate):\n"
        "        time.sleep(0.5)\n"
        "    return 0.0\n")
    rewards = (f"{{num_cpus_per_worker: 0.25, timeout_s: 600, components: [{{name: math_answer}}, "
               f"{{name: '{tmp_path / 'holding.py'}:hold', label: holding, kwargs: {{hold: '{hold}', gate: '{gate}'}}}}]}}")
    config = write_tiny_run(tmp_path, steps=steps, extra="save_every: 1", rewards=rewards)
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = start_cli("grpo", str(config))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:  # kill once two steps are checkpointed
        if gate.exists():
            break
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()[0][-3000:]
    leftovers = [p for p in psutil.Process(first.pid).children(recursive=True)]
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    hold.unlink()
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
