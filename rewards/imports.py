"""Config paths -> Python objects (user plug-ins: rewards, predicates, judges).

Two forms:
- `"pkg.module:attr"`: imported by name. When the module is not found on sys.path, the working
  directory is added to sys.path and the import tried again, so code beside the config is
  importable as it is under `dsarl submit` (which ships the working directory).
- `"path/to/file.py:attr"`: the file is loaded (relative to the working directory, or absolute)
  as a module of its own, once per process.
`attr` may be dotted (`module:Class.method`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path


def _import_module(path: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # only when the missing module is the one named (not an import inside it)
        named = e.name is not None and (module_name == e.name or module_name.startswith(e.name + "."))
        if not named or os.getcwd() in sys.path:
            raise ValueError(f"{path!r}: cannot import module {module_name!r}: {e}") from e
    sys.path.append(os.getcwd())
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{path!r}: cannot import module {module_name!r} (also tried from the working "
                         f"directory {os.getcwd()}): {e}") from e


def _load_file(path: str, file_name: str):
    file = Path(file_name).expanduser()
    file = (file if file.is_absolute() else Path.cwd() / file).resolve()
    if not file.is_file():
        raise ValueError(f"{path!r}: no file {file} (relative paths start at the working directory {os.getcwd()})")
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:10]
    module_name = f"dsarl_file_{file.stem}_{digest}"  # one module per file, the same name in every process
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def import_attr(path: str) -> object:
    """`"pkg.module:attr"` or `"path/file.py:attr"` -> the object; every error names the path."""
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not a 'module:attr' or 'file.py:attr' path")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        obj = _load_file(path, module_name)
    else:
        obj = _import_module(path, module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
