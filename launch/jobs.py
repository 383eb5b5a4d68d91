"""`dsarl submit | jobs | logs | stop`: dsarl stages as Ray jobs (ray.job_submission).

    dsarl submit --address http://HOST:8265 [--follow] STAGE CONFIG [key=value ...]
    dsarl jobs   --address http://HOST:8265
    dsarl logs   --address http://HOST:8265 ID [--follow]
    dsarl stop   --address http://HOST:8265 ID

Address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS. With none, `submit` starts a
private Ray head on 127.0.0.1 for the job, follows it and stops the head when the job ends (an
embedded run, packaged as on a cluster); jobs/logs/stop need an address (that head is gone by then).

Packaging. The job's runtime_env carries dsarl to every node, so nodes need only its dependencies
(torch, omegaconf, ... : see docs/cluster.md), not a dsarl install:
  * py_modules: a `dsarl/` folder assembled from the installed package (dsarl/__init__.py plus the
    root folders models/, kernels/, ... that setup.py maps into the namespace), so `import dsarl.x`
    works on a fresh node in the driver and in every actor;
  * working_dir: the submitting directory (default: the current one), the job's cwd, so relative
    config paths resolve as they do locally. Its `dsarl/` folder (the bare namespace stub at the repo
    root) is excluded: as the job's cwd it would shadow the assembled package.
A relative run_dir lands inside the working_dir copy on the node that runs the driver: give an
absolute path on shared storage (run_dir=/mnt/shared/runs/x) to keep checkpoints and metrics.
"""
import asyncio
import importlib.util
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from .config import PACKAGE_CONFIGS

# Root folders that setup.py maps to dsarl.<name> (tests/launch/test_jobs.py keeps the two equal).
ROOT_PACKAGES = ("models", "kernels", "actors", "rewards", "learner", "data", "launch", "configs")
STAGES = ("pretrain", "warmup", "sparse", "eval", "grpo", "run", "distill")
EXCLUDES = ["/dsarl/", "**/__pycache__", "*.pyc", "*.egg-info", "runs/", ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ENV_ADDRESSES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own order for the job API
EXIT_WITH_PARENT_ENV = "DSARL_EXIT_WITH_PARENT"  # set in every job's environment; `dsarl` then calls exit_with_parent


def exit_with_parent(poll_s: float = 1.0) -> None:
    """Ends this process (exit status 143, as for SIGTERM) once the job's entrypoint is gone.

    Ray stops a job by signalling the entrypoint's process and the children it lists at that moment. A
    `dsarl stop` left a training driver running at 100% CPU with parent 1 (orphaned, its working_dir
    already deleted): the entrypoint shell had not exec'd python but forked it, and died before python
    was listed. Ray starts each entrypoint as a session leader, so the job is over for this process when
    its parent changes, or when it is not that leader and the leader no longer exists. The second test
    also covers a driver orphaned before this guard started (it then sees parent 1 from the start).
    Checkpoints are atomic, so a resume loses at most the steps since the last one.
    Not for interactive use: a `nohup dsarl ... &` is meant to outlive its shell."""
    parent = os.getppid()

    def entrypoint_gone() -> bool:
        if os.getppid() != parent:
            return True
        leader = os.getsid(0)
        if leader == os.getpid():
            return False
        try:
            os.kill(leader, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            pass
        return False

    def watch() -> None:
        while not entrypoint_gone():
            time.sleep(poll_s)
        print(f"dsarl: this job's entrypoint is gone (parent was {parent}, session {os.getsid(0)}); exiting",
              file=sys.stderr, flush=True)
        os._exit(143)

    threading.Thread(target=watch, name="dsarl-exit-with-parent", daemon=True).start()


# ---------------------------------------------------------------- packaging


def build_package(dest: str | Path) -> Path:
    """Assembles DEST/dsarl from the installed dsarl (editable or not) and returns that folder."""
    out = Path(dest) / "dsarl"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(importlib.util.find_spec("dsarl").origin).parent, out, ignore=ignore)
    for name in ROOT_PACKAGES:
        src = Path(importlib.util.find_spec(f"dsarl.{name}").submodule_search_locations[0])
        if not (out / name).exists():  # a non-editable install already holds them
            shutil.copytree(src, out / name, ignore=ignore)
    return out


def runtime_env(package: Path, working_dir: Path, pip: list[str] = (), env_vars: dict | None = None) -> dict:
    env = {"working_dir": str(working_dir), "py_modules": [str(package)], "excludes": list(EXCLUDES),
           # unbuffered: --follow sees lines live; EXIT_WITH_PARENT_ENV: a stopped job's driver never outlives it
           "env_vars": {"PYTHONUNBUFFERED": "1", EXIT_WITH_PARENT_ENV: "1", **(env_vars or {})}}
    if pip:
        env["pip"] = list(pip)
    return env


def job_config_path(config: str, working_dir: Path) -> str:
    """The config's path as the job sees it (relative to the uploaded working_dir), or ValueError."""
    p = Path(config)
    if not p.is_absolute() and (working_dir / p).is_file():
        return p.as_posix()
    if p.is_absolute() and p.is_file() and p.resolve().is_relative_to(working_dir.resolve()):
        return p.resolve().relative_to(working_dir.resolve()).as_posix()
    if p.parts and p.parts[0] == "configs" and PACKAGE_CONFIGS.joinpath(*p.parts[1:]).is_file():
        return p.as_posix()  # shipped inside the package
    raise ValueError(f"config {config!r} is not a file inside the working directory {working_dir} (what the job "
                     "uploads) nor one of dsarl's bundled configs/; run from a folder that contains it or pass "
                     "--working-dir")


def entrypoint(python: str, stage: str, config: str, overrides: list[str], resume: bool | str) -> str:
    """resume: True passes `--resume` (newest checkpoint in run_dir), a path `--resume PATH`."""
    argv = [python, "-m", "dsarl.launch.cli", stage, config, *overrides]
    argv += ["--resume", resume] if isinstance(resume, str) else ["--resume"] if resume else []
    return shlex.join(argv)


# ---------------------------------------------------------------- job client


def job_client(address: str):
    """A JobSubmissionClient for exactly `address` (Ray's constructor would let RAY_API_SERVER_ADDRESS or
    RAY_ADDRESS override it silently)."""
    from ray.job_submission import JobSubmissionClient

    from .ray_setup import use_ray_auth_token

    use_ray_auth_token()
    saved = {k: os.environ.pop(k) for k in ENV_ADDRESSES if k in os.environ}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update(saved)


def submit_job(client, command: str, working_dir: Path, pip: list[str] = (), env_vars: dict | None = None,
               submission_id: str | None = None) -> str:
    """Packages dsarl, submits `command` as a Ray job and returns its submission id."""
    with tempfile.TemporaryDirectory(prefix="dsarl-pkg-") as tmp:
        package = build_package(tmp)
        return client.submit_job(entrypoint=command, runtime_env=runtime_env(package, working_dir, pip, env_vars),
                                 submission_id=submission_id, metadata={"dsarl": "1"})


def wait_terminal(client, job_id: str, poll_s: float = 1.0):
    """Polls until the job is SUCCEEDED / FAILED / STOPPED and returns its JobInfo."""
    last_note = time.monotonic()
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL:
            return info
        if time.monotonic() - last_note > 60:
            print(f"dsarl: job {job_id} is {info.status}: {info.message or ''}", file=sys.stderr)
            last_note = time.monotonic()
        time.sleep(poll_s)


def exit_status(info) -> int:
    if str(info.status) == "SUCCEEDED":
        return 0
    code = info.driver_exit_code
    return code if isinstance(code, int) and code > 0 else 1


def follow(client, job_id: str, out=None) -> int:
    """Streams the job's logs until it ends; returns its exit status (0 on success, else the driver's
    exit code, or 1 when it has none: stopped, or failed before the driver ran)."""
    out = out or sys.stdout

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream broke (dashboard restart, network): fall back to polling
        print(f"dsarl: lost the log stream of {job_id} ({e}); waiting for the job to end", file=sys.stderr)
    info = wait_terminal(client, job_id)
    code = exit_status(info)
    print(f"dsarl: job {job_id} {info.status}" + (f" (exit status {code})" if code else "")
          + (f": {info.message}" if info.message and code else ""), file=sys.stderr)
    return code


# ---------------------------------------------------------------- commands


def configure(parser, name: str) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray dashboard / job server, http://HOST:8265 "
                        "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
    if name == "submit":
        parser.add_argument("stage", choices=STAGES, help="the dsarl stage to run")
        parser.add_argument("config", help="YAML config, inside the working directory or one of dsarl's configs/")
        parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. run_dir=/shared/runs/a")
        parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                            help="pass --resume [CHECKPOINT] to the stage (a path as the cluster sees it)")
        parser.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its status")
        parser.add_argument("--working-dir", default=".", help="uploaded as the job's cwd (default: .)")
        parser.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
        parser.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job's nodes")
        parser.add_argument("--env", action="append", default=[],
                            help="KEY=VALUE for the job's environment, or KEY to copy it from here")
        parser.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    elif name in ("logs", "stop"):
        parser.add_argument("job_id", help="submission id (see `dsarl jobs`)")
        if name == "logs":
            parser.add_argument("--follow", action="store_true", help="stream until the job ends")
        else:
            parser.add_argument("--wait", action="store_true", help="wait until the job has stopped")


def run(args) -> int:
    handlers = {"submit": _submit, "jobs": _jobs, "logs": _logs, "stop": _stop}
    try:
        return handlers[args.command](args)
    except ValueError as e:
        print(f"dsarl {args.command}: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:
        print(f"dsarl {args.command}: cannot reach the Ray job server: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # the job server's answer: unknown job id, duplicate submission id, ...
        print(f"dsarl {args.command}: {e}", file=sys.stderr)
        return 1


def given_address(args) -> str | None:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    return args.address or next((os.environ[k] for k in ENV_ADDRESSES if os.environ.get(k)), None)


def _address(args) -> str:
    address = given_address(args)
    if not address:
        raise ValueError("no cluster given: pass --address http://HOST:8265 or set RAY_API_SERVER_ADDRESS")
    return address


def _env_vars(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep and key not in os.environ:
            raise ValueError(f"--env {key}: not set in this environment (use KEY=VALUE)")
        env[key] = value if sep else os.environ[key]
    return env


def _submit(args) -> int:
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise ValueError(f"--working-dir {args.working_dir}: not a directory")
    command = entrypoint(args.python, args.stage, job_config_path(args.config, working_dir), args.overrides,
                         args.resume)
    if not any(o.startswith("run_dir=") and Path(o.partition("=")[2]).is_absolute() for o in args.overrides):
        print("dsarl submit: note: no absolute run_dir override; unless the config's run_dir is absolute, the run "
              "is written inside the job's working_dir copy on one node: pass run_dir=/shared/path", file=sys.stderr)
    address = given_address(args)
    if address:
        return _submit_to(job_client(address), address, command, working_dir, args, follow_logs=args.follow)
    from .ray_setup import start_local_head

    print("dsarl submit: no --address or RAY_ADDRESS: starting a private Ray head on 127.0.0.1 for this job",
          file=sys.stderr)
    head = start_local_head(num_cpus=None, num_gpus=None)
    try:
        return _submit_to(job_client(head.dashboard_url), head.dashboard_url, command, working_dir, args,
                          follow_logs=True, stop_on_interrupt=True)
    finally:
        head.stop()


def _submit_to(client, address, command, working_dir, args, follow_logs, stop_on_interrupt=False) -> int:
    job_id = submit_job(client, command, working_dir, args.pip, _env_vars(args.env), args.submission_id)
    print(f"dsarl submit: job {job_id} on {address}: {command}", file=sys.stderr)
    if not follow_logs:
        print(job_id)
        return 0
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:
        if stop_on_interrupt:
            client.stop_job(job_id)
            return 130
        print(f"\ndsarl submit: stopped following; job {job_id} keeps running (dsarl logs / dsarl stop {job_id})",
              file=sys.stderr)
        return 130


def _jobs(args) -> int:
    jobs = sorted(job_client(_address(args)).list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'ID':<28} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for j in jobs:
        started = datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if j.start_time else "-"
        cmd = re.sub(r"^\S+ -m dsarl\.launch\.cli ", "dsarl ", j.entrypoint)
        print(f"{j.submission_id or j.job_id:<28} {str(j.status):<10} {started:<19} {cmd[:100]}")
    return 0


def _logs(args) -> int:
    client = job_client(_address(args))
    if args.follow:
        return follow(client, args.job_id)
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _stop(args) -> int:
    client = job_client(_address(args))
    stopped = client.stop_job(args.job_id)
    print(f"dsarl stop: {args.job_id}: " + ("stop requested" if stopped else "not running"), file=sys.stderr)
    if args.wait:
        print(f"dsarl stop: {args.job_id} {wait_terminal(client, args.job_id).status}", file=sys.stderr)
    return 0
