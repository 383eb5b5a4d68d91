"""transformers >= 5 imports its dependency `kernels` (Hugging Face's kernel hub) when its models load.
Under `python -m pytest` the repository root comes first on sys.path, and our kernels/ folder (imported
everywhere as dsarl.kernels) has that top-level name, so transformers would import ours and fail. The
installed package is imported once here, with the root out of the path, so `kernels` names it from then on."""
import importlib
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def _import_installed_kernels() -> None:
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:  # transformers < 5 does not need it
        pass
    finally:
        sys.path[:] = saved


_import_installed_kernels()
