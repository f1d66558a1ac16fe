"""The confidential run directory ``runs/<run-id>/`` and its ``state.json`` checkpoint.

Layout (ARCHITECTURE §8)::

    runs/<run-id>/            mode 0700: confidential
      config.yaml             the config as run (copied, for audit)
      state.json              which stages and shards are done; updated atomically
      noise.key               the release's secret noise key (mode 0600; keyed randomness)
      geography.parquet       the bottom units (block GEOIDs) the hierarchy is built from
      invariants/<level>.parquet   the declared public invariants of every unit of a level
      histograms/<kind>_<level>.parquet   true histograms per level (confidential)
      measurements/<kind>/<level>/shard-<s>.parquet   noisy measurements, write-once
      solved/<kind>/<level>/shard-<s>.parquet   published integer histograms per shard
      solved/<kind>_<level>.parquet   published integer histograms per level (merged)
      review/                 internal, truth-based review (never released)

:class:`RunDir` is the only place these paths are spelled; every stage and the review ask it.

``state.json`` is the single source of truth for resume: a stage is recorded as done only
after its output files were written and renamed into place, so a run killed at any point
resumes from the last recorded stage and recomputes at most the stage in flight. With the
stage it records the sha256 of every file the stage wrote (``files``); a later stage reads
a recorded file only through :meth:`RunDir.verified`, so a deleted, truncated or edited
artefact stops the run instead of silently changing the release. Updates of ``state.json``
hold an exclusive lock (``state.lock``), so concurrent shard tasks (threads, processes, Dask
workers on one machine) never lose each other's records.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DptabError, InputError, RefusedError
from pipeline.files import crash_point, sha256_file, write_json_atomic


class RunDirError(InputError):
    """The run directory is missing, foreign or inconsistent."""


class RunDirIntegrityError(DptabError):
    """A file a finished stage wrote is missing or changed (exit 1: the run stops)."""


class RunBusyError(RefusedError):
    """Another process is driving this run (exit 2): one driver per run directory."""


#: files verified in this process: (path, size, mtime_ns) -> sha256 (hash each version once)
_VERIFIED: dict[tuple[str, int, int], str] = {}
#: run directories this process drives: resolved root -> the open, flock-ed run.lock descriptor
_DRIVING: dict[str, int] = {}


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

    # ---- the files of a run (one place; nothing else spells these paths)

    @property
    def config_path(self) -> Path:
        """The resolved config as run (``config.yaml``)."""
        return self.root / "config.yaml"

    @property
    def key_path(self) -> Path:
        """The release's secret noise key (keyed randomness)."""
        return self.root / "noise.key"

    @property
    def geography_path(self) -> Path:
        """The sorted bottom-level GEOIDs (one column ``geoid``)."""
        return self.root / "geography.parquet"

    def invariants_path(self, level: str) -> Path:
        """Declared public invariants of every unit of ``level`` (see ``pipeline.inputs.invariants``)."""
        return self.root / "invariants" / f"{level}.parquet"

    def truth_path(self, kind: str, level: str) -> Path:
        """The confidential true histogram of one (run kind, level)."""
        return self.root / "histograms" / f"{kind}_{level}.parquet"

    def measurement_dir(self, kind: str, level: str) -> Path:
        """The write-once measurement shard files of one (run kind, level)."""
        return self.root / "measurements" / kind / level

    def measurement_path(self, kind: str, level: str, shard: int) -> Path:
        return self.measurement_dir(kind, level) / f"shard-{shard:05d}.parquet"

    def measurement_files(self, kind: str, level: str) -> list[Path]:
        """Every measurement shard file of one (run kind, level), in shard order."""
        return sorted(self.measurement_dir(kind, level).glob("shard-*.parquet"))

    def estimate_targets_path(self, kind: str, level: str) -> Path:
        """The full estimator's targets for the units of one level (``pipeline.job.estimate``)."""
        return self.root / "estimates" / kind / level / "targets.parquet"

    def estimate_lines_path(self, kind: str, level: str) -> Path:
        """The full estimator's per-line estimates and variances of one level (``pipeline.job.estimate``)."""
        return self.root / "estimates" / kind / level / "lines.parquet"

    @property
    def simulated_margins_path(self) -> Path:
        """The simulated margins of error per (table, level, line, size bin) (``pipeline.job.margins``)."""
        return self.root / "margins" / "simulated.parquet"

    @property
    def moving_cells_path(self) -> Path:
        """The published cells some margin rerun changed (the others get a margin of 0)."""
        return self.root / "margins" / "moving.parquet"

    def solved_shard_path(self, kind: str, level: str, shard: int) -> Path:
        return self.root / "solved" / kind / level / f"shard-{shard:05d}.parquet"

    def solved_path(self, kind: str, level: str) -> Path:
        """The published integer histogram of one finished (run kind, level)."""
        return self.root / "solved" / f"{kind}_{level}.parquet"

    @property
    def review_dir(self) -> Path:
        """Internal, truth-based review output (never released)."""
        return self.root / "review"

    def trials_path(self) -> Path:
        """Where an experiment collects the metrics of this trial run (beside the runs directory)."""
        return self.root.parent.parent / "trials" / f"{self.root.name}.parquet"

    @classmethod
    def create(cls, runs_dir: Path, run_id: str, initial_state: dict[str, Any],
               before_state: Callable[[Path], None] | None = None) -> "RunDir":
        """Create ``runs_dir/run_id`` with mode 0700 and an initial ``state.json``;
        ``before_state(root)`` writes what must exist before the state does (the config)."""
        runs_dir.mkdir(parents=True, exist_ok=True)
        root = runs_dir / run_id
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            raise RunDirError(f"{root} already exists: another run with this release id is being prepared or "
                              f"ran; resume it with `dptab run --resume {root}`, or choose a new release_id") from None
        os.chmod(root, 0o700)  # mkdir's mode is filtered by the umask
        if before_state is not None:
            before_state(root)
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

    def drive(self) -> None:
        """Become this run's one driver (an exclusive ``run.lock`` held by this process until it
        calls :meth:`release` or exits, a kill included); :class:`RunBusyError` if another
        process drives it. Stage tasks (threads, pool or Dask workers) need no lock of their own;
        what only a sole driver may do — removing a killed attempt's temp files — runs under it."""
        key = str(self.root.resolve())
        if key in _DRIVING:
            return
        fd = os.open(self.root / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusyError(f"{self.root}: another process is running this run; wait for it to finish (or "
                               "stop it) before resuming") from None
        _DRIVING[key] = fd

    def release(self) -> None:
        """Stop driving this run (see :meth:`drive`)."""
        fd = _DRIVING.pop(str(self.root.resolve()), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock for a read-modify-write of ``state.json``."""
        fd = os.open(self.root / "state.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def verified(self, path: Path) -> Path:
        """``path`` after checking it is the file a finished stage recorded (same sha256).
        Raises :class:`RunDirIntegrityError` naming the file if it is missing, unrecorded or changed."""
        path = Path(path)
        rel = self._rel(path)
        want = self.state().get("files", {}).get(rel)
        if want is None:
            raise RunDirIntegrityError(f"{path}: not recorded as written by a finished stage of this run")
        try:
            st = path.stat()
        except FileNotFoundError:
            raise RunDirIntegrityError(f"{path}: missing — a finished stage wrote it (sha256 {want[:12]}…); "
                                       "the run directory was changed, the run stops") from None
        key = (str(path), st.st_size, st.st_mtime_ns)
        got = _VERIFIED.get(key) or sha256_file(path)
        if got != want:
            raise RunDirIntegrityError(f"{path}: changed since its stage finished (sha256 {got[:12]}… instead of "
                                       f"{want[:12]}…); the run stops")
        _VERIFIED[key] = got
        return path

    def is_done(self, stage: str) -> bool:
        return stage in self.state()["done"]

    def done_info(self, stage: str) -> dict[str, Any] | None:
        return self.state()["done"].get(stage)

    def mark_done(self, stage: str, info: dict[str, Any] | None = None, files: Sequence[Path] = ()) -> None:
        """Record ``stage`` as complete with the sha256 of the ``files`` it wrote (call only
        after its outputs are in place)."""
        crash_point(f"before:{stage}")
        sums = {self._rel(f): sha256_file(f) for f in files}  # hashed outside the lock
        with self._locked():
            st = self.state()
            st["done"][stage] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
            st.setdefault("files", {}).update(sums)
            write_json_atomic(self.state_path, st)

    def update(self, **fields: Any) -> None:
        with self._locked():
            st = self.state()
            st.update(fields)
            write_json_atomic(self.state_path, st)
