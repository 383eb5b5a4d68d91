"""Time limits on reward calls: a killable child process (what the combiner uses), and the thread-based
limit it replaced (kept for bench/rewards.py's comparison).

`RewardProcess` owns one long-lived child (`python -m dsarl.rewards.child`, a fresh interpreter, never a
fork: Ray workers are threaded) that builds the rewards once and then runs the calls it is sent,
streaming back each result. The parent waits for each result with that call's limit; when one is
late it kills the child's process group (SIGKILL), records the call as `timeout`, starts a fresh
child and sends it the calls still to run. A child that dies during a call (os._exit, a segfault in
a C extension) fails that call as `error`; the rest of the batch still gets real scores. The child's
start (imports, reward constructors) is outside the per-call limits, under START_TIMEOUT_S.

`call_in_thread` runs one call in a daemon thread and stops waiting after the limit: it cannot stop
code that holds the GIL in C (big-integer or sympy arithmetic), and the hung thread lives on.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Callable

from dsarl.rewards.adapters import item_size

START_TIMEOUT_S = 120.0  # a fresh child's imports and reward constructors (a judge model may load)
ASYNC_GRACE_S = 1.0  # async calls: the child's own asyncio.wait_for reports first, the kill is the backstop
RESTART_ALLOWANCE_S = 5.0  # what time_bound allows for each kill and restart (usually ~1 s)


def call_in_thread(fn: Callable, arg, timeout_s: float) -> tuple[object, str, str]:
    """Run `fn(arg)` in a daemon thread; (value, status, error text), status ok | error | timeout."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(arg)
        except BaseException as e:  # noqa: BLE001
            box["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=target, daemon=True, name="dsarl-reward-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return None, "timeout", f"no result after {timeout_s:.3g}s"
    if "error" in box:
        return None, "error", box["error"]
    return box.get("value"), "ok", ""


def _kill(proc: subprocess.Popen, conn: Connection) -> int:
    """SIGKILL the child's process group (it and anything it started) -> its exit code."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    conn.close()
    return proc.wait()


class _Spawner:
    """Starts children from one thread that lives as long as its RewardProcess. The child asks Linux
    to SIGKILL it when its parent dies, and that parent-death signal follows the *thread* that
    started it: started from a Ray actor's call thread, it would die when that thread ends."""

    def __init__(self):
        self._requests: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="dsarl-reward-spawner")
        self._thread.start()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            args, kwargs, box, done = request
            try:
                box["proc"] = subprocess.Popen(args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                box["error"] = e
            done.set()

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        box, done = {}, threading.Event()
        self._requests.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def close(self) -> None:
        self._requests.put(None)


class RewardProcess:
    """Parent side of the reward child process for a list of RewardComponentConfig (see module docstring)."""

    def __init__(self, components: list):
        self.components = list(components)
        self.units: list[tuple[str, bool]] = []  # per component: (call unit, is_async), from the child
        self.restarts = 0  # children killed (late call) or lost (crashed call), each replaced, over the lifetime
        self._proc = self._conn = self._finalizer = None
        self._spawner = _Spawner()
        weakref.finalize(self, self._spawner.close)

    def start(self) -> None:
        """Start the child and build the rewards in it; ValueError with the child's traceback when a
        reward fails to build."""
        parent_sock, child_sock = socket.socketpair()
        try:
            proc = self._spawner.popen(
                [sys.executable, "-m", "dsarl.rewards.child", str(child_sock.fileno()), str(os.getpid())],
                pass_fds=(child_sock.fileno(),), start_new_session=True, cwd=os.getcwd(), stdin=subprocess.DEVNULL)
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        self._proc, self._conn = proc, conn
        self._finalizer = weakref.finalize(self, _kill, proc, conn)
        conn.send(("init", self.components, list(sys.path), os.getcwd()))
        try:
            if not conn.poll(START_TIMEOUT_S):
                raise RuntimeError(f"the reward process built nothing within {START_TIMEOUT_S:.0f}s")
            kind, payload = conn.recv()
        except (EOFError, OSError):
            kind, payload = "failed", f"the reward process exited with code {proc.wait()} while building"
        except RuntimeError:
            self.stop()
            raise
        if kind == "failed":
            self.stop()
            raise ValueError(f"in the reward process, {payload}")
        self.units = payload

    def stop(self) -> int | None:
        """Kill the child now -> its exit code (None when none was running)."""
        if self._finalizer is None or not self._finalizer.alive:
            return None
        return self._finalizer()

    def close(self) -> None:
        """Ask the child to exit, then make sure it has."""
        if self._finalizer is not None and self._finalizer.alive:
            try:
                self._conn.send(("close",))
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.stop()

    def _ensure_running(self) -> None:
        if self._proc is not None and self._finalizer.alive and self._proc.poll() is None:
            return
        if self._proc is not None and self._finalizer.alive:  # it died between calls
            self.stop()
            self.restarts += 1
        self.start()

    def run(self, index: int, items: list, limits: list[float]) -> list[list[tuple]]:
        """Call component `index` on every item (each within its limit, in seconds) -> per item, one
        (status, value, sub-scores, error) per sample; a late or lost call is failed, never dropped."""
        out: list = [None] * len(items)
        todo = list(range(len(items)))
        while todo:
            self._ensure_running()
            try:
                self._conn.send(("run", index, [items[i] for i in todo], [limits[i] for i in todo]))
            except OSError:  # the child went away between calls: start another and send again
                self.stop()
                self.restarts += 1
                continue
            waiting, status = self._collect(index, todo, limits, out)
            if status is None:
                break
            code = self.stop()
            self.restarts += 1  # the next call starts a fresh child
            stuck = waiting if self.units[index][1] else waiting[:1]  # async: every call in flight
            for i in stuck:
                error = (f"no result within its {limits[i]:.3g}s limit: the reward process was killed"
                         if status == "timeout" else f"the reward process died (exit code {code}) during this call")
                out[i] = [(status, None, {}, error)] * item_size(items[i])
            todo = [i for i in waiting if i not in stuck]
        return out

    def _collect(self, index: int, sent: list[int], limits: list[float], out: list) -> tuple[list[int], str | None]:
        """Receive the results of `sent` into `out` -> (items still waiting, None | "timeout" | "error")."""
        concurrent = self.units[index][1]
        waiting = list(sent)  # sync: the child runs them in this order, so waiting[0] is the one running
        start = time.monotonic()
        while waiting:
            limit = max(limits[i] for i in waiting) + ASYNC_GRACE_S if concurrent else limits[waiting[0]]
            if not self._conn.poll(max(0.0, start + limit - time.monotonic())):
                return waiting, "timeout"
            try:
                _, j, outcomes = self._conn.recv()
            except (EOFError, OSError):
                return waiting, "error"
            out[sent[j]] = outcomes
            waiting.remove(sent[j])
            if not concurrent:
                start = time.monotonic()
        return waiting, None


def time_bound(num_samples: int, num_components: int, timeout_s: float) -> float:
    """Seconds a RewardProcess may take for a chunk when every call runs out its limit and is restarted."""
    return num_samples * num_components * (timeout_s + ASYNC_GRACE_S + RESTART_ALLOWANCE_S)
