"""Every Ray a test starts listens on loopback only (issue #21 item 9), as `dsarl` runs do: the switch
must be in the environment before Ray is imported (see launch/ray_setup.py).

A test that draws fresh seeds (fresh_seeds.fresh_seed) and fails gets them in its report, so the failing
inputs can be drawn again: a rare draw once failed CI with nothing to reproduce it from."""
import os

import pytest

import fresh_seeds

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    fresh_seeds.DRAWN.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and fresh_seeds.DRAWN:
        report.sections.append(("fresh seeds", f"this test drew seeds {fresh_seeds.DRAWN} (fresh_seeds.fresh_seed)"))
