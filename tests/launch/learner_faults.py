"""The fault the learner-restart tests inject: SIGKILL of learner rank 0 inside the update that starts from
weight version `at_version` (once), through the real LearnerGroup.update."""
import contextlib
import os
import signal


@contextlib.contextmanager
def learner_killed_in_update(trainer, at_version: int = 2):
    """Yields the list the killed pid is appended to; restores LearnerGroup.update on exit."""
    group_update = type(trainer.learner).update
    killed: list[int] = []

    def kill_then_update(group, groups):
        if not killed and trainer.learner.weight_version() == at_version:
            killed.append(group.pids()[0])
            os.kill(killed[0], signal.SIGKILL)
        return group_update(group, groups)

    type(trainer.learner).update = kill_then_update
    try:
        yield killed
    finally:
        type(trainer.learner).update = group_update
