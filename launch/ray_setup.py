"""Where Ray runs: embedded on this machine, or an existing cluster; and a private local head.

    address given (config or --address)  -> that cluster
    else RAY_ADDRESS set                 -> that cluster (a submitted Ray job always has it set)
    else                                 -> Ray starts embedded in this process, on this machine

Embedded Ray listens on loopback only (`loopback_only`, default on): every server it starts (GCS,
raylets, workers' gRPC, the dashboard, the dashboard agent's HTTP server whose routes include the job
API, the runtime-env agent and the Prometheus metrics ports) binds 127.0.0.1. Ray takes the address
its servers bind from the node IP it detects, and resolves an explicit `_node_ip_address="127.0.0.1"`
back to the external address; the one switch that keeps it on loopback is the one Ray uses for its
single-machine mode on macOS and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read by Ray when it is
imported and by every process it starts, so it goes into the environment and into the already-imported
constant). A dashboard accepts job submissions, i.e. runs arbitrary commands, so it must not face a
network by accident; `dashboard_host` applies when `loopback_only` is off.

`LocalHead` starts a single-node head (`ray start --head --block`) in its own process session with its
own --temp-dir and ports, and stops exactly the processes it started. `ray stop` would kill every Ray
process on the machine, including other users' clusters; see docs/cluster.md.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# a private head's temp dir: short, because Ray's socket paths in it must fit 107 bytes
PRIVATE_HEAD_DIR, PRIVATE_HEAD_PREFIX = "/tmp", "dsray"

LOOPBACK = "127.0.0.1"


@dataclass
class RayConfig:
    address: str | None = None  # GCS address HOST:6379 or "auto"; None: RAY_ADDRESS, else embedded
    num_cpus: int | None = None  # embedded only; None: all of this machine's
    num_gpus: int | None = None  # embedded only
    include_dashboard: bool | None = None  # embedded only; None: Ray's default (on when installed)
    dashboard_host: str = LOOPBACK  # embedded only; 0.0.0.0 exposes job submission to the network
    loopback_only: bool = True  # embedded only: every Ray server binds 127.0.0.1 (a one-machine Ray)

# Ray's single-machine switch (ray/_private/ray_constants.py): node IP = 127.0.0.1 for every process
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_ray_on_loopback() -> None:
    """Makes Ray started from this process (and the processes it starts) bind loopback only."""
    os.environ[SINGLE_MACHINE_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # the copy Ray read at import, consulted per call


def resolve_address(address: str | None) -> str | None:
    """The cluster to join, or None for embedded Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise ValueError(f"Ray address {address!r} is a dashboard (job submission) address; a stage joins a "
                         "cluster by its GCS address (HOST:6379) or 'auto'. Use it with `dsarl submit` instead.")
    return address


def init_ray(cfg: RayConfig | None = None, temp_dir: str | None = None) -> str:
    """Starts or joins Ray (once per process) and returns a line saying which."""
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return "ray: already initialised in this process"
    address = resolve_address(cfg.address)
    if address is not None:
        ray.init(address=address)
        return f"ray: joined the cluster at {address}"
    if cfg.loopback_only:
        keep_ray_on_loopback()
    ctx = ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=cfg.include_dashboard,
                   dashboard_host=cfg.dashboard_host, _temp_dir=temp_dir)
    url = ctx.dashboard_url
    return "ray: embedded on this machine" + (f", dashboard http://{url}" if url else "")


def use_ray_auth_token() -> None:
    """Sends this user's Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) with
    job-API requests when RAY_AUTH_MODE is unset: the rule `ray start` applies to the clusters it starts,
    which then refuse job-API calls without it."""
    try:  # Ray's own helper (private); Ray versions without token authentication lack it
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """n distinct free ports. Every socket stays bound until all n are chosen: binding and closing one at a
    time let the system hand out the same port twice (a private head's client server and dashboard agent
    both got 54463, and `ray start` refused to come up)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalHead:
    """A running single-node Ray head started by `start_local_head`."""
    gcs_address: str  # for ray.init(address=...) / RAY_ADDRESS
    dashboard_url: str  # for JobSubmissionClient / dsarl submit --address
    temp_dir: str
    process: subprocess.Popen = field(repr=False)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminates this head's process tree and anything else running from its temp dir, nothing else."""
        import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
        import psutil

        procs = {}
        try:
            root = psutil.Process(self.process.pid)
            procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):  # processes re-parented away from the tree
            if any(self.temp_dir in arg for arg in (p.info["cmdline"] or [])):
                procs[p.pid] = p
                try:
                    procs.update({c.pid: c for c in p.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        procs.pop(os.getpid(), None)
        for p in procs.values():
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the head's session: started with its own
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.process.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_head(num_cpus: int | None = 2, num_gpus: int | None = 0, resources: str | None = None,
                     timeout_s: float = 120.0) -> LocalHead:
    """Starts `ray start --head --block` on 127.0.0.1 with fresh ports and a private temp dir, and waits
    until its job server answers (Ray's token authentication stays as Ray configures it). Raises
    RuntimeError with the head's log if it does not come up."""
    from ray.job_submission import JobSubmissionClient

    use_ray_auth_token()
    temp_dir = tempfile.mkdtemp(prefix=PRIVATE_HEAD_PREFIX, dir=PRIVATE_HEAD_DIR)
    gcs_port, dash_port, client_port, agent_port = free_ports(4)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           f"--node-ip-address={LOOPBACK}", f"--port={gcs_port}", f"--temp-dir={temp_dir}",
           "--include-dashboard=true",
           f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dash_port}",
           # ports Ray would otherwise take at fixed defaults, colliding with other heads on this machine
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
           "--disable-usage-stats"]
    cmd += [f"--num-cpus={num_cpus}"] if num_cpus is not None else []  # None: Ray counts this machine's
    cmd += [f"--num-gpus={num_gpus}"] if num_gpus is not None else []
    cmd += [f"--resources={resources}"] if resources else []
    log = open(Path(temp_dir) / "head.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[SINGLE_MACHINE_ENV] = "0"  # every server of this one-node head on loopback (see the module doc)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # jobs' `python` is this one
    with log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    head = LocalHead(f"{LOOPBACK}:{gcs_port}", f"http://{LOOPBACK}:{dash_port}", temp_dir, proc)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                JobSubmissionClient(head.dashboard_url).list_jobs()
                return head
            except (ConnectionError, RuntimeError, OSError):
                time.sleep(0.5)
    except BaseException:
        head.stop()
        raise
    text = (Path(temp_dir) / "head.log").read_text()[-3000:]
    head.stop()
    raise RuntimeError(f"ray head did not come up within {timeout_s:.0f}s (exit {proc.returncode}):\n{text}")


def start_together(**makers) -> tuple[dict[str, Any], BaseException | None]:
    """Calls each maker (an actor group's constructor, which waits for its actors) in its own thread, so
    the groups' processes start, import torch and load their weights at the same time rather than one
    group after another (a tiny run's three groups on 2 CPUs: 8.1 -> 5.5 s, mean of four). Every maker
    finishes before this returns: the groups that started (name -> group) and the first error in the
    makers' order, so the caller can stop what started before raising it."""
    with ThreadPoolExecutor(len(makers)) as pool:
        futures = {name: pool.submit(make) for name, make in makers.items()}
    started, errors = {}, []
    for name, future in futures.items():
        if future.exception() is None:
            started[name] = future.result()
        else:
            errors.append(future.exception())
    return started, errors[0] if errors else None
