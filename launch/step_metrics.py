"""A GRPO step's metrics from its parts: reward means over the samples that scored, the rounds' reward
counts merged, and the rollout workers' busy, idle and overlap time. Plain functions of plain data."""


def merge_reward_metrics(per_round: list[dict[str, float]]) -> dict[str, float]:
    """The reward pool's metrics of several rounds of equal size: means averaged, counts summed."""
    out: dict[str, float] = {}
    for m in per_round:
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
    return {k: (v / len(per_round) if k.endswith(("/mean", "_frac")) else v) for k, v in out.items()}


def rollout_timing(busy: list[list[tuple[float, float]]], wall: float,
                   learn_windows: list[tuple[float, float]]) -> dict[str, float]:
    """Per-worker averages over a step of `wall` seconds: generating time, idle time, and the time spent
    generating while the learner trained (the overlap asynchronous rollouts buy). `busy`: the generate
    calls that finished since the last step (one may have run during an earlier step's update, hence the
    recent update windows, wall clock)."""
    n = max(len(busy), 1)
    gen = sum(e - s for w in busy for s, e in w) / n
    overlap = sum(max(0.0, min(e, l1) - max(s, l0)) for w in busy for s, e in w for l0, l1 in learn_windows) / n
    return {"time/rollout_busy": gen, "time/rollout_idle": max(0.0, wall - gen), "time/overlap": overlap}


def present_means(scores: list[dict], prefix: str = "") -> dict[str, float]:
    """Mean of every key but "total" over the samples that have it: a failed sample has no sub-scores,
    and a reward's None ("no score") leaves its key out or None."""
    keys = dict.fromkeys(k for s in scores for k in s if k != "total")
    out = {}
    for k in keys:
        values = [s[k] for s in scores if s.get(k) is not None]
        if values:
            out[prefix + k] = sum(values) / len(values)
    return out


def is_correct(score: dict, key: str) -> bool:
    value = score.get(key)
    return value is not None and value > 0.5
