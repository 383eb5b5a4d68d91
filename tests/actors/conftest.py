"""Fixtures the reward-pool tests share."""
import sys
from pathlib import Path

import pytest
import ray

PLUGINS = str(Path(__file__).resolve().parents[1] / "rewards")  # tests/rewards/reward_plugins.py


@pytest.fixture(scope="module")
def reward_ray():
    """A local Ray whose workers, and this driver, import the test reward plug-ins by module name."""
    sys.path.insert(0, PLUGINS)  # the driver validates the config by resolving it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": PLUGINS}})
    yield
    ray.shutdown()
    sys.path.remove(PLUGINS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny decode steps are all overhead: extra threads only contend (10x slower on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
