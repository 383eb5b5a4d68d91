"""A small DSA config and random GRPO groups, shared by the learner tests."""
import random

from dsarl.data.step_types import GroupSample
from dsarl.models import DSAConfig


def small_cfg(**kw):
    base = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                index_head_dim=16, index_topk=4)
    base.update(kw)
    return DSAConfig(**base)


def random_groups(rng: random.Random, P: int, G: int, sampler_logp: float = -1.0,
                  completion_lens: tuple[int, int] = (1, 7)) -> list[GroupSample]:
    """P groups of G completions (1-7 tokens) of random prompts (2-9 tokens), advantages in [-1, 1]."""
    groups = []
    for _ in range(P):
        prompt = [rng.randrange(256) for _ in range(rng.randint(2, 9))]
        comps = [[rng.randrange(256) for _ in range(rng.randint(*completion_lens))] for _ in range(G)]
        groups.append(GroupSample(prompt, comps, [[sampler_logp] * len(c) for c in comps],
                                  [rng.uniform(-1, 1) for _ in range(G)]))
    return groups
