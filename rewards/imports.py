"""`"pkg.module:attr"` paths from config -> Python objects (user plug-ins: rewards, predicates, judges)."""
from __future__ import annotations

import importlib


def import_attr(path: str) -> object:
    """`"pkg.module:attr"` (attr may be dotted) -> the object; every error names the path."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not a 'module:attr' path")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{path!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
