"""Where the shipped schemas live: package data inside ``pipeline/schemas`` (also reachable as
``schemas/`` at the repository root, a symlink), so a non-editable install carries them."""

from __future__ import annotations

from pathlib import Path

#: specs, strategies, table shells, geolevels, the input contract and the manifest schema
SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
