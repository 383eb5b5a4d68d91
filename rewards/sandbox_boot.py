"""Sandbox bootstrap: runs as `python -I sandbox_boot.py` in a fresh process, as root at first.

Reads one JSON spec line from stdin, then, in this order: enters new network and mount namespaces
(no interface but a down loopback; /tmp, /var/tmp, /dev/shm, /run/lock replaced by private 1 MB
tmpfs mounts, so nothing written there reaches the host), sets rlimits (address space, CPU seconds, file size, open files,
processes), preloads the standard-library modules solutions use (the interpreter's own files may
be unreadable to the unprivileged uid), drops to the spec's unprivileged uid, installs audit hooks
(no sockets, no fork/exec/subprocess, no ctypes, no frame introspection, no writes outside its
directory), and runs the untrusted code. The result goes to the saved stdout as one line prefixed
with the spec's nonce; fds 1 and 2 are pointed at /dev/null while untrusted code runs.
Only the standard library is used here. Started by `dsarl.rewards.sandbox.run_sandboxed`.
"""
import io
import json
import os
import resource
import signal
import sys

PRELOAD = ("math", "cmath", "collections", "collections.abc", "itertools", "functools", "heapq",
           "bisect", "re", "string", "json", "random", "decimal", "fractions", "statistics",
           "typing", "dataclasses", "copy", "operator", "array", "queue", "datetime", "time",
           "enum", "textwrap", "unicodedata", "struct", "hashlib", "base64", "numbers", "abc",
           "contextlib", "traceback", "unittest", "doctest", "pprint", "io", "types", "weakref")
BLOCKED_EVENTS = ("socket.", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
                  "os.system", "os.kill", "os.killpg", "os.setsid", "subprocess.", "pty.", "ctypes.",
                  "sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
                  "os.chroot", "os.putenv", "os.unsetenv", "mmap.", "winreg.", "os.startfile")
PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1,
               "os.chown": 1, "os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.utime": 1,
               "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.move": 2}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CLONE_NEWNET, CLONE_NEWNS = 0x40000000, 0x00020000
MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_BIND = 0x4000, 0x40000, 0x2, 0x4, 0x1000
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def isolate(workdir: str) -> bool:
    """New network and mount namespaces; the host's world-writable directories are covered by
    small throwaway tmpfs mounts (our cwd, already inside `workdir`, stays reachable). Root only."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    os.chdir(workdir)
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        return False
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    for d in WORLD_WRITABLE:
        if os.path.isdir(d):
            ok = libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=1777")
            if ok != 0:
                return False
    # Put the (now hidden) work directory back at its own path, so absolute paths to it work.
    os.makedirs(workdir, exist_ok=True)
    if libc.mount(b"/proc/self/cwd", workdir.encode(), None, MS_BIND, None) != 0:
        return False
    os.chdir(workdir)
    return True


def set_limits(spec: dict) -> None:
    mem = spec["memory_bytes"]
    for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem),
                         (resource.RLIMIT_CPU, spec["cpu_seconds"]),
                         (resource.RLIMIT_FSIZE, spec["max_file_bytes"]),
                         (resource.RLIMIT_NOFILE, spec["max_open_files"]),
                         (resource.RLIMIT_NPROC, spec["max_processes"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    assert os.getuid() == uid and os.geteuid() == uid, "privilege drop failed"


def inside(path, root: str) -> bool:
    if isinstance(path, int):
        return True  # an fd was already opened under the rules
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == root or real.startswith(root + os.sep) or real == os.devnull


def make_audit_hook(root: str):
    def hook(event, args):
        if event.startswith(BLOCKED_EVENTS):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
            if writes and path is not None and not inside(path, root):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in PATH_EVENTS:
            for path in args[:PATH_EVENTS[event]]:
                if not inside(path, root):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the sandbox directory")

    return hook


class CappedText(io.TextIOBase):
    """A text sink keeping at most `cap` characters (stdout for one test case)."""

    def __init__(self, cap: int):
        self.cap, self.parts, self.size, self.truncated = cap, [], 0, False

    def write(self, s):
        room = self.cap - self.size
        if len(s) > room:
            self.truncated = True
        self.parts.append(s[:max(room, 0)])
        self.size += min(len(s), max(room, 0))
        return len(s)

    def getvalue(self):
        return "".join(self.parts)


def run_code(code: str, stdin_text: str, cap: int) -> dict:
    """Execute `code` as __main__ with `stdin_text` as stdin; capture stdout up to `cap` chars."""
    out = CappedText(cap)
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin_text), out, CappedText(cap)
    error = None
    try:
        exec(compile(code, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        if e.code not in (None, 0):
            error = f"SystemExit: {e.code}"
    except BaseException as e:  # noqa: BLE001 - any failure of untrusted code is a failed test
        error = f"{type(e).__name__}: {str(e)[:500]}"
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return {"ok": error is None, "error": error, "stdout": out.getvalue(), "truncated": out.truncated}


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    nonce, root = spec.pop("nonce"), os.path.realpath(spec["dir"])
    isolated = isolate(root) if spec["isolate"] else False  # also enters `root`
    if not spec["isolate"]:
        os.chdir(root)
    for name in PRELOAD + tuple(spec["preload"]):
        __import__(name)
    set_limits(spec)
    if spec["uid"] is not None:
        drop_privileges(spec["uid"])
    os.environ.clear()
    os.environ.update({"HOME": root, "TMPDIR": root, "PATH": "/usr/bin:/bin"})
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if spec["audit_hooks"]:
        sys.addaudithook(make_audit_hook(root))
    cases = [run_code(spec["code"], stdin_text, spec["max_output_chars"]) for stdin_text in spec["stdins"]]
    line = json.dumps({"cases": cases, "isolated": isolated, "uid": os.getuid()})
    os.write(result_fd, ("\n" + nonce + line + "\n").encode())


if __name__ == "__main__":
    main()
