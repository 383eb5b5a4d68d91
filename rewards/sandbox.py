"""Run untrusted Python in a contained subprocess: `run_sandboxed(code, stdins, limits) -> SandboxResult`.

Containment, each layer independent of the others:
- a fresh `python -I` process in its own session (process group) and its own temporary directory,
  with a minimal environment (no inherited secrets), stdin/stdout as pipes read with a size cap;
- rlimits: address space (memory), CPU seconds, file size (output cap), open files, processes;
- as root: new network and mount namespaces (no route anywhere; the host's world-writable
  directories hidden under throwaway tmpfs mounts) and a switch to a fresh unprivileged uid,
  so RLIMIT_NPROC binds (root ignores it) and every leftover process can be found and killed;
- audit hooks (`sys.addaudithook`) refusing sockets, fork/exec/subprocess, ctypes, frame
  introspection and writes outside the directory (these give clear errors; the OS layers above are
  what protects the host if the hooks are bypassed);
- a wall-clock limit, after which (and after every run) the process group and every process of
  the sandbox uid are SIGKILLed, and the directory is removed.
When not root, the uid switch and namespace are skipped and the other layers still apply.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BOOT = Path(__file__).with_name("sandbox_boot.py")
UID_BASE, UID_SPAN = 10_000_000, 10_000_000  # sandbox uids: unused by any account on the host


@dataclass(frozen=True)
class SandboxLimits:
    time_s: float = 5.0  # wall clock for the whole process, including interpreter start
    memory_mb: int = 512  # RLIMIT_AS
    max_file_kb: int = 1024  # RLIMIT_FSIZE: largest file the code may write
    max_output_chars: int = 65536  # stdout kept per test case
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 4  # RLIMIT_NPROC for the sandbox uid (threads count too)
    audit_hooks: bool = True
    preload: tuple = ()  # extra modules to import before dropping privileges (e.g. "numpy")


@dataclass(frozen=True)
class SandboxResult:
    cases: list = field(default_factory=list)  # per stdin: {"ok", "error", "stdout", "truncated"}
    status: str = "ok"  # "ok" | "timeout" | "crashed" (no result line: killed, OOM, closed fd)
    wall_s: float = 0.0
    uid: Optional[int] = None
    isolated: bool = False  # network + mount namespaces were entered
    stderr: str = ""


def _read_capped(stream, cap: int, out: list) -> None:
    """Read a pipe to EOF, keeping the first `cap` bytes (the rest is drained and dropped)."""
    kept = bytearray()
    while chunk := stream.read(65536):
        if len(kept) < cap:
            kept += chunk[: cap - len(kept)]
    out.append(bytes(kept))


def live_pids_of_uid(uid: int) -> list[int]:
    """Pids of live (not zombie) processes whose real uid is `uid`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                pids.append(int(pid))
        except (OSError, KeyError, ValueError):
            continue
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (a fresh sandbox uid, never a real account) until none is left."""
    for _ in range(100):
        pids = live_pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)


def run_sandboxed(code: str, stdins: list[str], limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` once per entry of `stdins` (as `__main__`, that text on stdin) inside the sandbox.

    Every case runs in the same process, one after the other, under one time limit.
    Returns per-case `ok` (no exception, exit code 0) and captured stdout.
    """
    is_root = os.geteuid() == 0
    uid = UID_BASE + secrets.randbelow(UID_SPAN) if is_root else None
    workdir = tempfile.mkdtemp(prefix="dsarl-sandbox-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)
    nonce = secrets.token_hex(16)
    spec = {"nonce": nonce, "dir": workdir, "uid": uid, "isolate": is_root,
            "memory_bytes": limits.memory_mb << 20, "cpu_seconds": max(1, int(limits.time_s + 1)),
            "max_file_bytes": limits.max_file_kb << 10, "max_open_files": limits.max_open_files,
            "max_processes": limits.max_processes, "max_output_chars": limits.max_output_chars,
            "audit_hooks": limits.audit_hooks, "preload": list(limits.preload),
            "code": code, "stdins": list(stdins)}
    cap = 4 * limits.max_output_chars * max(1, len(stdins)) + 65536
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-I", str(BOOT)], cwd=workdir, start_new_session=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, close_fds=True)
    out, err = [], []
    readers = [threading.Thread(target=_read_capped, args=(proc.stdout, cap, out), daemon=True),
               threading.Thread(target=_read_capped, args=(proc.stderr, 8192, err), daemon=True)]
    for t in readers:
        t.start()
    status = "ok"
    try:
        proc.stdin.write((json.dumps(spec) + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        proc.wait(timeout=limits.time_s)
    except subprocess.TimeoutExpired:
        status = "timeout"
    finally:
        _kill_all(proc, uid)
        for t in readers:
            t.join(timeout=2.0)
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - start
    stdout = out[0].decode("utf-8", "replace") if out else ""
    stderr = err[0].decode("utf-8", "replace") if err else ""
    marker = stdout.rfind(nonce)
    if status == "ok" and marker >= 0:
        try:
            payload = json.loads(stdout[marker + len(nonce):].splitlines()[0])
            return SandboxResult(payload["cases"], "ok", wall, uid, payload["isolated"], stderr)
        except (ValueError, KeyError, IndexError):
            pass
    return SandboxResult([], status if status != "ok" else "crashed", wall, uid, False, stderr)


def _kill_all(proc: subprocess.Popen, uid: Optional[int]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _kill_uid(uid)
    proc.wait()
