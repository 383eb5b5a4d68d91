"""Synthetic tasks with verifiable answers, for pretraining, RL and long-context evaluation.

Every generator takes a `random.Random` (seeded by the caller from (seed, split, index), so a
dataset is reproducible and splits never overlap) and returns a row: a dict with at least
`prompt`, `answer` and `task`, plus whatever metadata reward functions may want.
"""
import random
import string

TASKS = {}


def register_task(name: str):
    def wrap(fn):
        TASKS[name] = fn
        return fn

    return wrap


@register_task("arithmetic")
def arithmetic(rng: random.Random, min_digits: int = 1, max_digits: int = 3, ops: str = "+-") -> dict:
    """`347+86=` -> `433`: multi-digit addition/subtraction (results may be negative)."""
    a = rng.randint(0, 10 ** rng.randint(min_digits, max_digits) - 1)
    b = rng.randint(0, 10 ** rng.randint(min_digits, max_digits) - 1)
    op = rng.choice(ops)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"prompt": f"{a}{op}{b}=", "answer": str(value), "task": "arithmetic", "language": "en"}


def _random_token(rng: random.Random, length: int, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def random_kv_pairs(rng: random.Random, n_pairs: int, key_len: int, value_len: int) -> tuple[list[str], list[str]]:
    """n_pairs unique lowercase keys in random order, each with a random digit value."""
    keys: set[str] = set()
    while len(keys) < n_pairs:
        keys.add(_random_token(rng, key_len, string.ascii_lowercase))
    keys_list = sorted(keys)
    rng.shuffle(keys_list)
    return keys_list, [_random_token(rng, value_len, string.digits) for _ in keys_list]


@register_task("kv_retrieval")
def kv_retrieval(rng: random.Random, context_len: int = 512, key_len: int = 4, value_len: int = 4,
                 needle_depth: float | None = None) -> dict:
    """A long list of `key:value` pairs (about `context_len` bytes), then `?key:` -> its value.

    Every key is unique and stated once, at a random depth (or `needle_depth` in [0, 1]), so the
    answer must be retrieved from far back: what sparse attention has to keep finding.
    """
    pair_len = key_len + value_len + 2  # "kkkk:vvvv "
    n_pairs = max(2, context_len // pair_len)
    keys_list, values = random_kv_pairs(rng, n_pairs, key_len, value_len)
    target = rng.randrange(n_pairs) if needle_depth is None else min(n_pairs - 1, int(needle_depth * n_pairs))
    context = " ".join(f"{k}:{v}" for k, v in zip(keys_list, values))
    return {
        "prompt": f"{context}\n?{keys_list[target]}:",
        "answer": values[target],
        "task": "kv_retrieval",
        "language": "en",
        "context_len": context_len,
        "needle_depth": target / n_pairs,
    }


FILLER_WORDS = ("the of and to in is was for that with as on by at from his her but not are this have had "
                "which one you were all they she there been their has when who will more would out into time "
                "only after some what over about than them two may first then could these other like new "
                "grass sky green blue sun water river stone hill tree field cloud wind light day night").split()


def passkey_haystack(rng: random.Random, context_len: int, n_needles: int, value_len: int, filler: str = "random"
                     ) -> tuple[str, list[str], list[str]]:
    """About context_len bytes of lowercase filler words with n_needles `Kvv` needles at random depths.

    filler `random`: random letters (2-7 per word): nothing in it can be predicted, attention over it
    has nothing to find. `words`: words drawn from FILLER_WORDS (the classic passkey haystack is
    repeated prose): after a word's first letters its rest is known from the last few tokens, so the
    model attends locally there, as language models do over most of real text.

    Each needle key K is a distinct uppercase letter (so at most 26), stated once; vv are random digits.
    Neither appears in the filler, so the key matches exactly one earlier token: the single-token
    lookup (an induction head) that a small byte-level model learns quickly, unlike kv_retrieval's
    multi-byte keys drawn from the same letters as every other key. -> (text, keys, values)."""
    if not 0 <= n_needles <= 26:
        raise ValueError(f"passkey: n_needles must be in 0..26, got {n_needles}")
    keys = rng.sample(string.ascii_uppercase, n_needles)
    values = [_random_token(rng, value_len, string.digits) for _ in keys]
    if filler not in ("random", "words"):
        raise ValueError(f"passkey: filler must be 'random' or 'words', got {filler!r}")
    words, size = [], 0
    while size < context_len:
        words.append(rng.choice(FILLER_WORDS) if filler == "words"
                     else _random_token(rng, rng.randint(2, 7), string.ascii_lowercase))
        size += len(words[-1]) + 1
    slots = sorted(rng.randint(0, len(words)) for _ in range(n_needles))  # needle i goes before word slots[i]
    order = list(range(n_needles))
    rng.shuffle(order)  # which key sits at which depth
    for j, slot in reversed(list(enumerate(slots))):
        words.insert(slot, keys[order[j]] + values[order[j]])
    return " ".join(words), keys, values


@register_task("passkey")
def passkey(rng: random.Random, context_len: int = 512, n_needles: int = 8, value_len: int = 2,
            filler: str = "random") -> dict:
    """Passkey retrieval: `...filler Q37 filler ... K05 ...\n?Q` -> `37` (see passkey_haystack).

    The other needles are distractors; the asked one is at a uniformly random depth."""
    if n_needles < 1:
        raise ValueError(f"passkey: n_needles must be in 1..26, got {n_needles}")
    text, keys, values = passkey_haystack(rng, context_len, n_needles, value_len, filler)
    i = rng.randrange(n_needles)
    return {
        "prompt": f"{text}\n?{keys[i]}",
        "answer": values[i],
        "task": "passkey",
        "language": "en",
        "context_len": context_len,
        "needle_depth": text.index(keys[i] + values[i]) / len(text),
    }


def get_task(name: str):
    """The generator registered as `name`. The distillation domains (data/domains.py: `code_lambda`,
    `mixed`) register on import, so they are imported here on a miss: `task.name=mixed` works from
    any entry point."""
    if name not in TASKS:
        from . import domains  # noqa: F401  (registers its tasks)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name]


def make_rows(task: str, n: int, seed: int, split: str = "train", **kwargs) -> list[dict]:
    """n rows of a task; row i of a split is the same for a given seed whatever n is."""
    gen = get_task(task)
    rows = []
    for i in range(n):
        rng = random.Random(f"{seed}/{split}/{task}/{i}")
        row = gen(rng, **kwargs)
        row["id"] = f"{task}-{split}-{i}"
        rows.append(row)
    return rows
