"""The reward process: builds the configured rewards and runs the calls its parent sends.

Started by `dsarl.rewards.timeouts.RewardProcess` as `python -m dsarl.rewards.child FD PARENT_PID`,
it talks over the socket FD (multiprocessing's Connection framing, pickles):

    parent -> ("init", components, sys.path, cwd)        child -> ("ready", [(unit, is_async), ...])
                                                                  or ("failed", which and traceback text)
    parent -> ("run", component index, items, limits)   child -> ("result", j, outcomes) per item
    parent -> ("close",)

An item is what one call takes (a sample, a group's samples, or a chunk's; see adapters.BuiltReward);
`outcomes` has one (status, value, sub-scores, error text) per sample of the item, status one of
ok | none | error | timeout | nan, and error text the full traceback for a raised exception.
Synchronous rewards run their items one after another, sending each result as it is ready (the
parent kills this process when one is late: code stuck in C cannot be stopped any other way).
`async def` rewards run all items of a call at once on the process's one event loop, each under
`asyncio.wait_for(limit)` (no cap on how many: a reward that calls a rate-limited service bounds
its own concurrency); the parent's kill still bounds one that blocks the loop.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection

from dsarl.rewards.adapters import BuiltReward, item_size
from dsarl.rewards.registry import build_component
from dsarl.rewards.values import to_value


def _one(raw) -> tuple:
    try:
        value = to_value(raw)
    except ValueError as e:
        return ("nan", None, {}, str(e))
    return ("none", None, {}, "") if value is None else ("ok", value[0], value[1], "")


def outcomes(raw, item, unit: str) -> list[tuple]:
    """A call's return -> one outcome per sample of the item."""
    if unit == "sample":
        return [_one(raw)]
    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):
        raw = raw.tolist()  # a numpy array or tensor of per-sample rewards
    if not isinstance(raw, (list, tuple)) or len(raw) != len(item):
        got = f"{len(raw)} results" if isinstance(raw, (list, tuple)) else type(raw).__name__
        return failed("error", f"a {unit} reward returned {got} for {len(item)} samples", len(item))
    return [_one(r) for r in raw]


def failed(status: str, error: str, n: int) -> list[tuple]:
    return [(status, None, {}, error)] * n


async def _await(awaitable, limit: float):
    return await asyncio.wait_for(awaitable, limit)


def call_one(reward: BuiltReward, item, limit: float, loop: asyncio.AbstractEventLoop) -> list[tuple]:
    """One synchronous call (awaiting its result on `loop` if it returned an awaitable)."""
    try:
        raw = reward.call(item)
        if inspect.isawaitable(raw):
            raw = loop.run_until_complete(_await(raw, limit))
        return outcomes(raw, item, reward.unit)
    except asyncio.TimeoutError:
        return failed("timeout", f"no result after {limit:.3g}s (asyncio.wait_for)", item_size(item))
    except BaseException:  # noqa: BLE001 - a reward's failure is a result, not the end of this process
        return failed("error", traceback.format_exc(), item_size(item))


async def call_all_async(reward: BuiltReward, items: list, limits: list, send) -> None:
    """Every item at once; each result is sent when it is ready."""
    async def one(j: int) -> None:
        try:
            raw = reward.call(items[j])
            raw = await asyncio.wait_for(raw, limits[j]) if inspect.isawaitable(raw) else raw
            result = outcomes(raw, items[j], reward.unit)
        except asyncio.TimeoutError:
            result = failed("timeout", f"no result after {limits[j]:.3g}s (asyncio.wait_for)", item_size(items[j]))
        except BaseException:  # noqa: BLE001 - incl. a CancelledError or SystemExit of the reward's own
            result = failed("error", traceback.format_exc(), item_size(items[j]))
        send(("result", j, result))

    await asyncio.gather(*(one(j) for j in range(len(items))))


def serve(conn: Connection) -> None:
    _, components, sys_path, cwd = conn.recv()
    sys.path[:] = sys_path  # resolve user code exactly as the parent does
    os.chdir(cwd)
    try:
        import math_verify  # noqa: F401 - math_answer's first call (and anyone's) would pay this import in its limit
    except ImportError:
        pass
    rewards = []
    for c in components:
        try:
            rewards.append(build_component(c))
        except BaseException:  # noqa: BLE001
            conn.send(("failed", f"reward component {c.key!r} ({c.name}) failed to build:\n{traceback.format_exc()}"))
            return
    conn.send(("ready", [(r.unit, r.is_async) for r in rewards]))
    loop = asyncio.new_event_loop()  # one loop for the process's life: async rewards may keep clients bound to it
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "close":
            return
        _, index, items, limits = message
        reward = rewards[index]
        if reward.is_async:
            loop.run_until_complete(call_all_async(reward, items, limits, conn.send))
        else:
            for j, item in enumerate(items):
                conn.send(("result", j, call_one(reward, item, limits[j], loop)))


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), so a call stuck in C does not outlive a
    killed worker; elsewhere the socket's EOF ends it at its next read."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[2]))
    serve(Connection(int(sys.argv[1])))
