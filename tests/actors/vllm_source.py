"""Reads vLLM's public signatures from a release wheel's source, without importing vLLM (it needs a
GPU build of torch, which this machine does not have): the wheel is fetched with `pip download
--no-deps` and its .py files are parsed with `ast`."""
import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_CACHE = Path(os.environ.get("DSARL_VLLM_WHEELS", Path.home() / ".cache" / "dsarl" / "vllm-wheels"))


def fetch_wheel(version: str) -> Path:
    """The vllm==version wheel, downloaded once into WHEEL_CACHE. Raises RuntimeError saying why not."""
    found = sorted(WHEEL_CACHE.glob(f"vllm-{version}-*.whl"))
    if found:
        return found[0]
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux1_x86_64",
           f"vllm=={version}", "-d", str(WHEEL_CACHE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pip download vllm=={version} took over 900 s") from None
    found = sorted(WHEEL_CACHE.glob(f"vllm-{version}-*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pip download vllm=={version} failed: {done.stderr.strip()[-500:]}")
    return found[0]


class VLLMSource:
    """The classes and functions of one vLLM wheel, looked up by name."""

    def __init__(self, wheel: Path):
        self.wheel = wheel
        self._zip = zipfile.ZipFile(wheel)
        self._trees: dict[str, ast.Module] = {}

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self._zip.read(path).decode(), filename=path)
        return self._trees[path]

    def files(self, prefix: str) -> list[str]:
        return [n for n in self._zip.namelist() if n.startswith(prefix) and n.endswith(".py")]

    def find_class(self, name: str, prefix: str = "vllm/") -> tuple[str, ast.ClassDef]:
        """The one top-level class `name` under `prefix` (the first file that defines it)."""
        for path in self.files(prefix):
            for node in self.tree(path).body:
                if isinstance(node, ast.ClassDef) and node.name == name:
                    return path, node
        raise LookupError(f"no class {name} under {prefix} in {self.wheel.name}")

    def fields(self, class_name: str, prefix: str = "vllm/") -> set[str]:
        """Annotated class-level attributes (dataclass / msgspec / TypedDict fields), base classes defined
        in the same package included."""
        path, cls = self.find_class(class_name, prefix)
        names = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id.startswith("_"):  # a private base of the same module
                names |= self.fields(base.id, path)
        return names

    def parameters(self, class_name: str, method: str, prefix: str = "vllm/") -> set[str]:
        """Parameter names of class_name.method (positional, keyword-only)."""
        _, cls = self.find_class(class_name, prefix)
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == method:
                a = node.args
                return {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]} - {"self"}
        raise LookupError(f"{class_name} has no method {method} in {self.wheel.name}")

    def exports(self, module_path: str) -> set[str]:
        """Names a package's __init__ imports (what `from package import X` finds)."""
        names = set()
        for node in ast.walk(self.tree(module_path)):
            if isinstance(node, ast.ImportFrom):
                names |= {a.asname or a.name for a in node.names}
        return names
