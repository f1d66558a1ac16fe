"""Where the shipped schemas live: package data inside ``pipeline/schemas`` (also reachable as
``schemas/`` at the repository root, a symlink), so a non-editable install carries them."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError

#: specs, strategies, table shells, geolevels, the input contract and the manifest schema
SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"


def schema_path(name_or_path: str | Path, folder: Path = SCHEMAS_DIR) -> Path:
    """A YAML file: a path as given when it has a suffix, else ``folder/<name>.yaml``."""
    p = Path(name_or_path)
    return p if p.suffix else folder / f"{name_or_path}.yaml"


def relative_to(ref: str, base: Path) -> str:
    """A reference inside a YAML file (a name, or a ``.yaml`` path): a relative path resolved
    against ``base`` (the referring file's folder), anything else as given."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") and not p.is_absolute():
        return str((base / p).resolve())
    return ref


#: libyaml's safe loader where PyYAML was built with it (6-8x faster on the shipped tables and
#: specs; same safe constructors), else the pure-Python one
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=64)
def _parse(text: str) -> Any:
    """A YAML document parsed once per content: every shard of a run reloads the run's spec and
    strategies (~30 ms each for PL94 with the pure-Python parser), minutes over a national run's
    shards. Keyed by the text itself, so an edited file is always parsed anew."""
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 (a safe loader)


def parse_yaml(text: str) -> Any:
    """A YAML document (safe loading, parsed once per content; the caller gets its own copy).
    Raises ``yaml.YAMLError`` on invalid YAML. The one YAML parser of the package."""
    return copy.deepcopy(_parse(text))


def load_yaml(path: Path, error: type[InputError], what: str) -> Any:
    """The YAML document at ``path``; ``error`` (naming the file and ``what`` it should be) if the
    file is missing or not valid YAML. The one reader of configs, specs, strategies, geolevels
    and table definitions."""
    try:
        # a copy: callers may edit what they get, the parse is shared
        return parse_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: a directory, not a {what} file") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from None
