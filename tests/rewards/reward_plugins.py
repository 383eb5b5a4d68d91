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
