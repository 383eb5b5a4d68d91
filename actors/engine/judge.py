"""LLM judges for rubric rewards: a rollout engine asked for P("yes") per criterion.

Name one in a reward config (`rewards/rubric.py`):
    {name: rubric, kwargs: {judge: "dsarl.actors.engine.judge:native_judge",
                            judge_kwargs: {checkpoint_dir: runs/judge/final}}}
or, to share a judge served by a running Ray rollout worker:
    {name: rubric, kwargs: {judge: "dsarl.actors.engine.judge:ray_judge", judge_kwargs: {actor_name: judge}}}
"""
import ray
import torch


def native_judge(checkpoint_dir: str, max_batch_size: int = 16, num_threads: int = 0, device=None):
    """A NativeEngine on a checkpoint, in this process (each reward worker holds its own copy)."""
    from dsarl.models import from_pretrained

    from .native import NativeEngine

    if num_threads:
        torch.set_num_threads(num_threads)
    model, tokenizer = from_pretrained(checkpoint_dir, device=device)
    return NativeEngine(model.eval().requires_grad_(False), tokenizer, max_batch_size=max_batch_size)


class RayJudge:
    """Forwards yes_probability to a named Ray actor (e.g. a RolloutWorker serving the judge model)."""

    def __init__(self, actor_name: str, namespace: str | None = None):
        self.actor = ray.get_actor(actor_name, namespace=namespace)

    def yes_probability(self, prompts: list[str]) -> list[float]:
        return ray.get(self.actor.yes_probability.remote(prompts))


def ray_judge(actor_name: str, namespace: str | None = None) -> RayJudge:
    return RayJudge(actor_name, namespace)
