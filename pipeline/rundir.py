"""The confidential run directory ``runs/<run-id>/`` and its ``state.json`` checkpoint.

Layout (ARCHITECTURE §8)::

    runs/<run-id>/            mode 0700: confidential
      config.yaml             the config as run (copied, for audit)
      state.json              which stages and shards are done; updated atomically
      noise.key               the release's secret noise key (mode 0600; keyed randomness)
      histograms/             true histograms per level (confidential)
      measurements/           noisy measurements, one write-once file per (run kind, level, shard)
      solved/                 published integer histograms per level (post-processed)
      review/                 internal, truth-based review (never released)

``state.json`` is the single source of truth for resume: a stage is recorded as done only
after its output files were written and renamed into place, so a run killed at any point
resumes from the last recorded stage and recomputes at most the stage in flight.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class RunDirError(RuntimeError):
    """The run directory is missing, foreign or inconsistent."""


#: Fault injection for the kill-and-resume tests: when this environment variable names a
#: crash point, the process SIGKILLs itself there (nothing is flushed or cleaned up), exactly
#: like an operator's ``kill -9`` or a lost machine at that instant.
CRASH_ENV = "DPTAB_CRASH_AT"


_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die at ``name`` if the crash-test variable asks for it (no-op otherwise).

    The variable is ``name`` (die at the first hit) or ``name#k`` (die at the k-th hit).
    """
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    target, _, nth = want.partition("#")
    if target != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file + fsync + rename (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point(f"mid-write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_run_id(dataset_id: str) -> str:
    """A sortable, unique run id: ``<dataset>-<UTC time>-<random>``."""
    return f"{dataset_id}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


@dataclass
class RunDir:
    """Handle on one run directory; all paths derive from ``root``."""

    root: Path

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def sub(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @classmethod
    def create(cls, runs_dir: Path, run_id: str, initial_state: dict[str, Any]) -> "RunDir":
        """Create ``runs_dir/run_id`` with mode 0700 and an initial ``state.json``."""
        runs_dir.mkdir(parents=True, exist_ok=True)
        root = runs_dir / run_id
        root.mkdir(mode=0o700)
        os.chmod(root, 0o700)  # mkdir's mode is filtered by the umask
        rd = cls(root)
        write_json_atomic(rd.state_path, {"run_id": run_id, "done": {}, **initial_state})
        return rd

    @classmethod
    def open(cls, root: Path) -> "RunDir":
        root = Path(root)
        if not (root / "state.json").is_file():
            raise RunDirError(f"{root}: not a run directory (no state.json)")
        return cls(root)

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    def is_done(self, stage: str) -> bool:
        return stage in self.state()["done"]

    def done_info(self, stage: str) -> dict[str, Any] | None:
        return self.state()["done"].get(stage)

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        """Record ``stage`` as complete (call only after its outputs are in place)."""
        crash_point(f"before:{stage}")
        st = self.state()
        st["done"][stage] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
        write_json_atomic(self.state_path, st)

    def update(self, **fields: Any) -> None:
        st = self.state()
        st.update(fields)
        write_json_atomic(self.state_path, st)
