"""What a wheel (non-editable) install carries, and the install commands README.md gives.

The wheel test builds dsarl's wheel from a copy of the source tree (`pip wheel --no-deps
--no-build-isolation`: no network, the test venv's setuptools), checks every C kernel source and every
bundled config YAML is inside, installs it into a plain folder and, in a fresh interpreter whose path
has that folder but not the repository, compiles and runs a C kernel from the installed sources.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
C_SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").rglob("*.c"))
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
NOT_SOURCE = (".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
              ".hypothesis", "*.so")

PROBE = r"""
import sys
from pathlib import Path
import torch
import dsarl
from dsarl.kernels import native
from dsarl.kernels.topk import cpu as topk_cpu
target = Path(sys.argv[1]).resolve()
assert Path(dsarl.__file__).resolve().is_relative_to(target), f"dsarl imported from {dsarl.__file__}"
for op in sys.argv[2:]:
    module = __import__(f"dsarl.kernels.{op}.cpu", fromlist=["SOURCE"])
    assert Path(module.SOURCE).resolve().is_relative_to(target), f"{op}: source {module.SOURCE}"
    assert native.unavailable_reason(module.SOURCE) is None, f"{op}: {native.unavailable_reason(module.SOURCE)}"
g = torch.Generator().manual_seed(0)
scores = torch.randn(2, 37, 301, generator=g)  # [B, T, S]
got = topk_cpu.topk_indices_cpu(scores, 19).flatten(0, 1)
want = scores.topk(19, dim=-1).indices.flatten(0, 1)
assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()], "the C top-k disagrees with torch.topk"
print("OK")
"""


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build's build/ and *.egg-info never touch the working tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (built,) = (tmp / "dist").glob("dsarl-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_carries_the_c_sources_and_the_configs(wheel):
    assert C_SOURCES, "no kernels/**/*.c found: the test looks in the wrong place"
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in C_SOURCES + CONFIGS if f"dsarl/{p}" not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


@pytest.mark.slow
def test_a_wheel_install_builds_and_runs_the_c_kernels(wheel, tmp_path):
    if _compiler() is None:
        pytest.skip("no C compiler: the C kernels cannot build anywhere on this machine")
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ops = sorted({Path(p).parent.name for p in C_SOURCES})
    env = {**os.environ, "PYTHONPATH": str(target), "DSARL_NATIVE_CACHE": str(tmp_path / "native-cache")}
    run = subprocess.run([sys.executable, "-c", PROBE, str(target), *ops], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stderr[-3000:]
    assert len(list((tmp_path / "native-cache").rglob("*.so"))) == len(ops)  # built here, from the wheel's sources


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return block.group(1).strip().splitlines()


def test_the_readme_commands_install_with_the_constraints_file():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert all("/pip install -c constraints.txt -e " in c for c in commands), commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1].split(" && ", 1)[1] in ci, "CI must run README's second command verbatim"


def test_the_constraints_pin_torch_inside_pyproject_range():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_range,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    pins = [Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    (torch_pin,) = [r for r in pins if r.name == "torch"]
    (pinned,) = [s.version for s in torch_pin.specifier if s.operator == "=="]
    assert torch_range.specifier.contains(pinned), (str(torch_range), pinned)
