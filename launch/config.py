"""Loading typed configs: OmegaConf YAML merged onto dataclass schemas (structured configs).

Unknown keys, wrong types and invalid choices fail at load with the key and the file named;
dotlist overrides (`optim.lr=3e-4`) apply on top, and are named as coming from the command line.
"""
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dsarl.models.config import ConfigError

PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def resolve_path(path: str | None, base_file: str | Path | None = None) -> str | None:
    """A path from a config: as given (absolute or relative to the working directory), else relative
    to the config file's folder, else inside dsarl's bundled configs/."""
    if path is None:
        return None
    p = Path(path)
    candidates = [p]
    if base_file is not None:
        candidates.append(Path(base_file).resolve().parent / p)
    if p.parts and p.parts[0] == "configs":
        candidates.append(PACKAGE_CONFIGS.joinpath(*p.parts[1:]))
    for c in candidates:
        if c.exists():
            return str(c)
    return str(p)


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"key '{key}': {msg}" if key else msg


def _apply_override(base, override: str):
    """One `key=value` (value in OmegaConf's dotlist grammar) set into `base`. Unlike merging a
    dotlist, a key may index a list: `domains.0.opd_weight=2`."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"command-line override {override!r}: expected key=value")
    OmegaConf.update(base, key, OmegaConf.from_dotlist([f"value={value}"]).value, merge=True)
    return base


def check_yaml_mapping(path: Path) -> None:
    """A config file must parse as YAML and hold a mapping (or nothing). OmegaConf alone would raise
    the YAML parser's exception, fail a list with a bare TypeError, and read a scalar `foo` as the key
    `foo: null`."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got a {type(raw).__name__}")


def load_config(schema, path: str | Path | None, overrides: list[str] | tuple = ()):
    """-> an instance of the dataclass `schema` from YAML `path` (None: defaults) and overrides."""
    base = OmegaConf.structured(schema)
    if path is not None:
        path = Path(resolve_path(str(path)))
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        check_yaml_mapping(path)
        try:
            loaded = OmegaConf.load(path)
            base = OmegaConf.merge(base, loaded)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_describe(e)}") from None
    if overrides:
        try:
            for override in overrides:
                base = _apply_override(base, override)
        except OmegaConfBaseException as e:
            raise ConfigError(f"command-line override: {_describe(e)}") from None
    try:
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path or 'config'}: {_describe(e)}") from None
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    if hasattr(cfg, "config_path"):
        cfg.config_path = str(path) if path is not None else None
    return cfg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
