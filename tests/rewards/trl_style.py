"""Reward functions in the shapes TRL's GRPOTrainer documents for `reward_funcs` (our own bodies):
keyword lists in, one float (or None) per completion out."""
import asyncio
import re


def reward_func(completions, ground_truth, **kwargs):
    """Reference-based: 1.0 when the boxed answer is the `ground_truth` column's value."""
    out = []
    for completion, truth in zip(completions, ground_truth):
        found = re.findall(r"\\boxed\{([^}]*)\}", completion)
        out.append(1.0 if found and found[-1].strip() == str(truth) else 0.0)
    return out


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def format_reward_func(completions, **kwargs):
    """Conversational format: each completion is a list holding one assistant message."""
    texts = [c[0]["content"] for c in completions]
    return [1.0 if re.fullmatch(r"<think>.*</think><answer>.*</answer>", t, re.DOTALL) else 0.0 for t in texts]


def math_only_reward(prompts, completions, task, **kwargs):
    """Multi-task data: None (no score) for rows of another task."""
    return [None if t != "math" else (1.0 if "4" in c else -1.0) for c, t in zip(completions, task)]


async def async_reward_func(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [1.0 if c else 0.0 for c in completions]


def token_count(completions_ids, **kwargs):
    return [float(len(ids)) for ids in completions_ids]


def what_it_got(prompts, completions, **kwargs):
    """Encodes the keyword names it was called with, so a test can read them back: 1.0 per sample
    when they are exactly prompts, completions, the non-prompt columns and trainer_state=None."""
    ok = sorted(kwargs) == ["level", "source", "trainer_state"] and kwargs["trainer_state"] is None
    return [float(ok) + level for level in kwargs["level"]]


def batch_sizes(prompts, completions, **kwargs):
    """Returns the size of the batch it was called with, for every sample of it."""
    return [float(len(completions))] * len(completions)
