"""`dsarl submit | jobs | logs | stop` against a real Ray head on 127.0.0.1, started for this module.

The head runs from a private --temp-dir with fresh ports and is stopped by LocalHead.stop(), which
ends only its own process tree (never `ray stop`, which would kill other users' clusters).
"""
import ast
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsarl.launch.cli import main
from dsarl.launch.jobs import ROOT_PACKAGES, follow, job_client, job_config_path, submit_job
from dsarl.launch.ray_setup import LOOPBACK, RayConfig, free_ports, init_ray, resolve_address, start_local_head

REPO = Path(__file__).resolve().parents[2]
TINY = ["steps=4", "log_every=1", "batch_size=4", "seq_len=32", "save_every=4"]


@pytest.fixture(scope="module")
def head():
    h = start_local_head(num_cpus=2, num_gpus=0, resources='{"dsarl_test_head": 1}')
    yield h
    h.stop()


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the working_dir uploaded with each job
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)


def test_free_ports_are_distinct_and_free():
    """A private head's four ports come from one free_ports call. 512 are all different: bound and closed one
    at a time, 20 of 20 draws of 512 loopback ports held a repeat (and a head once got 54463 for both its
    client server and its dashboard agent, and did not start). Each is free again after."""
    ports = free_ports(512)
    assert len(set(ports)) == 512
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind((LOOPBACK, port))


def test_root_packages_match_setup_py():
    tree = ast.parse((REPO / "setup.py").read_text())
    assigned = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", None) == "ROOT_PACKAGES")
    assert tuple(ast.literal_eval(assigned)) == ROOT_PACKAGES


def test_job_server_listens_on_loopback_only(head):
    import ray  # noqa: F401  (Ray's vendored psutil)
    import psutil

    port = int(head.dashboard_url.rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening == ["127.0.0.1"], listening
    assert RayConfig().dashboard_host == "127.0.0.1"  # embedded Ray's default too


def test_job_imports_dsarl_from_the_shipped_package_not_this_checkout(head, in_repo):
    """On this machine the editable install would also work; the job must not rely on it."""
    client = job_client(head.dashboard_url)
    probe = ("python -c 'import dsarl, dsarl.launch.cli, dsarl.models, dsarl.kernels, dsarl.configs; "
             "import os; print(\"GUARD\", os.environ.get(\"DSARL_EXIT_WITH_PARENT\")); "
             "print(\"ORIGIN\", dsarl.__file__, dsarl.launch.cli.__file__, dsarl.models.__file__)'")
    job_id = submit_job(client, probe, REPO)
    out = io.StringIO()
    assert follow(client, job_id, out) == 0, out.getvalue()
    origins = next(line for line in out.getvalue().splitlines() if line.startswith("ORIGIN")).split()[1:]
    assert len(origins) == 3
    for path in origins:
        assert not path.startswith(str(REPO)), path
        assert "runtime_resources" in path and "/dsarl/" in path, path
    assert "GUARD 1" in out.getvalue()  # the driver's environment turns on exit_with_parent in `dsarl`


def test_submit_pretrain_follows_logs_to_success(head, in_repo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["submit", "--address", head.dashboard_url, "--follow", "pretrain", "configs/pretrain_tiny.yaml",
                 *TINY, f"run_dir={run_dir}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"pretrain: final checkpoint at {run_dir}/final" in captured.out  # the job's own output, streamed
    assert "SUCCEEDED" in captured.err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    job_id = captured.err.split("dsarl submit: job ", 1)[1].split()[0]

    assert main(["jobs", "--address", head.dashboard_url]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(job_id))
    _, status, _, _, command = row.split(None, 4)
    assert status == "SUCCEEDED" and command.startswith("dsarl pretrain configs/pretrain_tiny.yaml steps=4")
    assert main(["logs", "--address", head.dashboard_url, job_id]) == 0
    assert "final checkpoint at" in capsys.readouterr().out


def test_failing_job_reports_failure_and_its_exit_status(head, in_repo, capsys):
    code = main(["submit", "--address", head.dashboard_url, "--follow", "pretrain", "configs/pretrain_tiny.yaml",
                 "optim.lrr=3", "run_dir=/tmp/never"])
    captured = capsys.readouterr()
    assert code == 2, captured.err  # the stage's exit status for a config error
    assert "optim.lrr" in captured.out + captured.err  # the job's own message, streamed
    assert "FAILED (exit status 2)" in captured.err


def test_a_job_asking_for_100_gpus_fails_at_start_naming_what_is_missing(head, in_repo):
    """In a job, init_ray joins the cluster through RAY_ADDRESS and placement refuses at once."""
    client = job_client(head.dashboard_url)
    script = ("from dsarl.launch.ray_setup import init_ray; "
              "from dsarl.actors.placement import ResourceSpec, create_placement_group; "
              "print(init_ray()); "
              "create_placement_group([ResourceSpec('rollout', 2, 0.5, 0), ResourceSpec('learner', 4, 1, 25)], "
              "timeout_s=600)")
    job_id = submit_job(client, f'python -c "{script}"', REPO)
    out = io.StringIO()
    assert follow(client, job_id, out) == 1
    log = out.getvalue()
    assert "ray: joined the cluster" in log
    assert "InsufficientResourcesError" in log and "cluster: CPU 2 on 1 node(s)" in log
    assert "learner: 4 x {CPU 1, GPU 25} = CPU 4, GPU 100; missing CPU 2, GPU 100" in log


def test_submit_without_follow_prints_the_id_then_stop_ends_the_job(head, in_repo, tmp_path, capsys):
    code = main(["submit", "--address", head.dashboard_url, "pretrain", "configs/pretrain_tiny.yaml",
                 "steps=100000", "log_every=1", "batch_size=4", "seq_len=32", f"run_dir={tmp_path / 'long'}"])
    assert code == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("raysubmit_")
    assert main(["stop", "--address", head.dashboard_url, job_id, "--wait"]) == 0
    assert f"{job_id} STOPPED" in capsys.readouterr().err
    # Stopped means the training process is gone (one once ran on as an orphan): allow the exit-with-parent
    # guard its poll interval in case Ray's stop missed it, then no live process may name this run_dir
    assert _poll_until_empty(lambda: _live_processes_naming(str(tmp_path / "long")), timeout_s=15) == []
    assert main(["logs", "--address", head.dashboard_url, "--follow", job_id]) == 1  # stopped is not success


def _poll_until_empty(list_fn, timeout_s: float) -> list:
    """list_fn() once it is empty, or its last value after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (found := list_fn()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_a_job_driver_whose_entrypoint_dies_exits_and_an_unguarded_one_does_not(tmp_path):
    """exit_with_parent, the guard every job's `dsarl` driver runs. Each driver's parent is a session
    leader, as Ray starts an entrypoint; SIGKILL it (what a stop that misses the driver leaves behind):
    - `guarded` started the guard before: it exits;
    - `late` starts the guard only after its parent died, already orphaned (how the driver Ray's stop
      missed in CI looked: python forked by the entrypoint shell, still importing): it exits;
    - `unguarded` lives on, which is the failure the guard prevents."""
    drivers = {}
    for name, guard in (("guarded", "exit_with_parent(0.1)"), ("late", "exit_with_parent(0.1)"), ("unguarded", "")):
        ready, go = tmp_path / f"{name}.ready", tmp_path / f"{name}.go"
        wait_for_go = f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n" if name == "late" else ""
        driver = (f"import pathlib, time\nfrom dsarl.launch.jobs import exit_with_parent\n{wait_for_go}{guard}\n"
                  f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(120)  # {tmp_path}")
        # the parent starts the driver, prints its pid, and sleeps until killed
        parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                   f"p = subprocess.Popen([sys.executable, '-c', {driver!r}]); "
                                   "print(p.pid, flush=True); time.sleep(120)"],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        drivers[name] = (parent, int(parent.stdout.readline()), ready, go)

    def running(pid: int) -> list[int]:
        return [p for p in _live_processes_naming(str(tmp_path)) if p == pid]

    try:
        for name, (parent, pid, ready, go) in drivers.items():
            if name != "late":
                assert _poll_until_empty(lambda: [] if ready.exists() else [0], timeout_s=60) == []
            parent.kill()
            parent.wait()
            if name == "late":
                go.touch()
                assert _poll_until_empty(lambda: [] if ready.exists() or not running(pid) else [0], 60) == []
        assert _poll_until_empty(lambda: running(drivers["guarded"][1]), timeout_s=15) == []
        assert _poll_until_empty(lambda: running(drivers["late"][1]), timeout_s=15) == []
        assert running(drivers["unguarded"][1])  # orphaned and still running: what the guard ends
    finally:
        for pid in _live_processes_naming(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)


def test_address_flag_beats_the_environment_and_the_environment_beats_nothing(head, in_repo, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing listens there
    assert main(["jobs", "--address", head.dashboard_url]) == 0  # Ray alone would use RAY_ADDRESS
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", head.dashboard_url)
    assert main(["jobs"]) == 0
    assert capsys.readouterr().out.startswith("ID")


def test_unknown_job_and_missing_address_are_errors_not_tracebacks(head, in_repo, capsys):
    assert main(["logs", "--address", head.dashboard_url, "raysubmit_nosuchjob"]) == 1
    assert "raysubmit_nosuchjob" in capsys.readouterr().err
    assert main(["jobs"]) == 2
    assert "--address" in capsys.readouterr().err


def test_config_paths_resolve_inside_the_uploaded_working_dir(tmp_path):
    assert job_config_path("configs/pretrain_tiny.yaml", REPO) == "configs/pretrain_tiny.yaml"
    assert job_config_path(str(REPO / "configs/pretrain_tiny.yaml"), REPO) == "configs/pretrain_tiny.yaml"
    assert job_config_path("configs/pretrain_tiny.yaml", tmp_path) == "configs/pretrain_tiny.yaml"  # bundled
    outside = tmp_path / "mine.yaml"
    outside.write_text("steps: 1\n")
    with pytest.raises(ValueError, match="working directory"):
        job_config_path(str(outside), REPO)


def test_ray_address_env_joins_that_cluster(head, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", head.gcs_address)
    try:
        assert "joined" in init_ray(RayConfig())
        assert ray.cluster_resources().get("dsarl_test_head") == 1
    finally:
        ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", head.dashboard_url)
    with pytest.raises(ValueError, match="dashboard"):
        resolve_address(None)


def _processes_with_arg(match, skip_zombies: bool = False) -> list[int]:
    """Pids of processes with a command-line argument for which match(arg) holds."""
    import ray  # noqa: F401  (Ray's vendored psutil)
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if not (skip_zombies and p.info["status"] == psutil.STATUS_ZOMBIE)
            and any(match(a) for a in (p.info["cmdline"] or []))]


def _live_processes_naming(text: str) -> list[int]:
    return _processes_with_arg(lambda arg: text in arg, skip_zombies=True)


def _private_head_processes(exclude: str) -> list[int]:
    from dsarl.launch.ray_setup import PRIVATE_HEAD_DIR, PRIVATE_HEAD_PREFIX

    prefix = f"{PRIVATE_HEAD_DIR}/{PRIVATE_HEAD_PREFIX}"
    return _processes_with_arg(lambda arg: prefix in arg and exclude not in arg)


def test_submit_without_address_runs_on_a_private_head_and_stops_it(head, in_repo, tmp_path, capsys):
    assert _private_head_processes(head.temp_dir) == []
    code = main(["submit", "pretrain", "configs/pretrain_tiny.yaml", *TINY, "tensorboard=false",
                 f"run_dir={tmp_path / 'emb'}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "private Ray head on 127.0.0.1" in captured.err and "SUCCEEDED" in captured.err  # followed to the end
    assert (tmp_path / "emb" / "final").is_dir()
    assert _private_head_processes(head.temp_dir) == []  # its head is gone, the module's head untouched
    assert main(["jobs", "--address", head.dashboard_url]) == 0
