"""User-style reward plug-ins for the tests, referenced as "reward_plugins:<name>"."""
import time


def words(sample, per_word=1.0):
    return per_word * len(sample.completion.split())


def from_row(sample):
    return {"score": float(sample.row["bonus"]), "raw_len": float(len(sample.completion))}


def boom(sample):
    raise RuntimeError("reward bug")


def hang(sample):
    time.sleep(3600)


def nan(sample):
    return float("nan")


def group_rank(samples):
    """Group reward: the sample's rank by length inside its group (0 = shortest)."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].num_tokens)
    ranks = [0.0] * len(samples)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


class Scaled:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, sample):
        return self.factor * sample.num_tokens


def exit_process(sample):
    """Kills the whole worker process (like a segfault in a C extension) when the row says so."""
    import os

    if sample.row.get("die"):
        os._exit(1)
    return 0.0


def spin_in_c(sample):
    """Big-integer power: minutes inside one C call that holds the GIL, when the row says so."""
    if sample.row.get("spin"):
        return float(10 ** (10 ** 10) % 7)
    return 1.0


def boom_if(sample):
    if sample.row.get("boom"):
        raise RuntimeError(f"bad row {sample.row}")
    return 1.0


def none_if_skipped(sample):
    """No score for rows marked skip (e.g. another task's rows), else the token count."""
    return None if sample.row.get("skip") else float(sample.num_tokens)


def array_scalars(sample):
    """numpy / torch scalars as a reward library returns them, chosen by row["kind"]."""
    import numpy as np
    import torch

    kind = sample.row["kind"]
    return {"f32": np.float32(0.5), "i64": np.int64(3), "bool": np.bool_(True), "tensor": torch.tensor(0.25),
            "tensor1": torch.tensor([1.5]), "dict": {"score": np.float64(0.75), "n": np.int64(2)},
            "list": [1.0], "str": "1.0", "vector": np.array([1.0, 2.0])}[kind]


class DeclaresFailureValue:
    """A penalty in [-0.5, 0] that declares its worst value as what a failed call scores."""

    failure_value = -0.5

    def __call__(self, sample):
        if sample.row.get("boom"):
            raise ValueError("cannot score")
        return -0.25


class WaitForAll:
    """Async: each call waits until `n` calls have started, so awaiting them one by one never finishes."""

    def __init__(self, n):
        self.n, self.arrived, self.all_in = n, 0, None

    async def __call__(self, sample):
        import asyncio

        if self.arrived == 0:
            self.all_in = asyncio.Event()
        event = self.all_in
        self.arrived += 1
        if self.arrived == self.n:
            self.arrived = 0
            event.set()
        await event.wait()
        return float(sample.sample_index)


async def sleeps_forever_if(sample):
    import asyncio

    if sample.row.get("sleep"):
        await asyncio.sleep(3600)
    return 2.0


class FailsToBuild:
    def __init__(self, model_path="missing"):
        raise RuntimeError(f"cannot load {model_path}")

    def __call__(self, sample):
        return 1.0


def trl_without_names(*args, **kwargs):
    """Nothing in this signature says TRL: `style: trl` in the config says it."""
    return [float(len(c)) for c in kwargs["completions"]]


def stalls_when_told(sample):
    """The completion's length; but the first `<row["stall_dir"]>/stalls` calls to see that file (over every
    worker: each claims its turn n with an exclusive create) stall, for a test to SIGKILL the Ray worker
    mid-chunk, after writing the worker's pid (this reward process's parent) to `stalled-<n>`."""
    import os

    where = sample.row.get("stall_dir")
    if where:
        for n in range(int(open(os.path.join(where, "stalls")).read())):
            try:
                os.close(os.open(os.path.join(where, f"claim-{n}"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:  # an earlier call (in this worker or another) had turn n
                continue
            with open(os.path.join(where, f".pid-{n}"), "w") as f:
                f.write(str(os.getppid()))
            os.rename(os.path.join(where, f".pid-{n}"), os.path.join(where, f"stalled-{n}"))  # never half-written
            time.sleep(600)  # ends with the worker: the reward process dies with its parent
    return float(len(sample.completion))


def kills_its_worker_if(sample):
    """The completion's length; but a row with `poison` SIGKILLs the Ray worker hosting this reward process
    (its parent) every time it is scored, as a reward exhausting the worker's memory would."""
    import os
    import signal

    if sample.row.get("poison"):
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(600)  # ends with the worker
    return float(len(sample.completion))
