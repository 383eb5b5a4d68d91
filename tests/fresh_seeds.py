"""Fresh random seeds for tests that compare against a reference on new inputs every run, and the record
that makes a failure reproducible: conftest.py prints the seeds a failing test drew."""
import random

DRAWN: list[int] = []  # the seeds drawn by the test now running (conftest.py clears it before each test)


def fresh_seed() -> int:
    """A seed from the OS's entropy, recorded so that a failing test's report names it."""
    seed = random.SystemRandom().randrange(2**31)
    DRAWN.append(seed)
    return seed
