"""The confidential run directory ``runs/<run-id>/`` and its ``state.json`` checkpoint.

Layout (ARCHITECTURE §8)::

    runs/<run-id>/            mode 0700: confidential
      config.yaml             the config as run (copied, for audit)
      state.json              which stages are done; updated atomically
      shards.jsonl            which shards are done: one appended record per shard
      noise.key               the release's secret noise key (mode 0600; keyed randomness)
      geography.parquet       the bottom units (block GEOIDs) the hierarchy is built from
      invariants/<level>.parquet   the declared public invariants of every unit of a level
      histograms/<kind>_<level>.parquet   true histograms per level (confidential)
      measurements/<kind>/<level>/shard-<s>.parquet   noisy measurements, write-once
      solved/<kind>/<level>/shard-<s>.parquet   published integer histograms per shard
      solved/<kind>_<level>.parquet   published integer histograms per level (merged)
      review/                 internal, truth-based review (never released)

:class:`RunDir` is the only place these paths are spelled; every stage and the review ask it.

``state.json`` with ``shards.jsonl`` is the single source of truth for resume: a stage is
recorded as done only after its output files were written and renamed into place, so a run
killed at any point resumes from the last recorded stage and recomputes at most the stage in
flight. With the stage it records the sha256 of every file the stage wrote (``files``); a later
stage reads a recorded file only through :meth:`RunDir.verified`, so a deleted, truncated or
edited artefact stops the run instead of silently changing the release. Updates hold an
exclusive lock (``state.lock``), so concurrent shard tasks (threads, processes, Dask workers on
one machine) never lose each other's records.

Why two files: a national run has thousands of shards. Rewriting one JSON document that lists
them all after every shard (and re-parsing it for every check) made each shard's bookkeeping
grow with the number of shards, quadratic over the run (~0.4 s per shard at 100 M persons).
Per-shard stages (:data:`JOURNALED`) are therefore appended to ``shards.jsonl``, one line
each, and read incrementally (a process parses only the lines appended since it last looked);
``state.json`` keeps the run's fields and the few per-level stages. A line cut short by a kill
is not a record (its shard is redone, reusing its write-once measurements) and is cut off
before the next append.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DptabError, InputError, RefusedError
from pipeline.files import copy_file_sha256, crash_point, sha256_file, write_json_atomic


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
#: stages recorded in ``shards.jsonl`` instead of ``state.json`` (many per level)
JOURNALED = ("shard:", "measure:")


@dataclass
class _Journal:
    """What this process has read of one run's ``shards.jsonl``: the file (inode), how far
    (bytes of complete lines), and the records so far."""

    inode: int = -1
    offset: int = 0
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


#: per run directory (resolved): this process's view of ``shards.jsonl``
_JOURNALS: dict[str, _Journal] = {}
#: guards the two caches here: stages run on threads too (the Prefect thread runner, the
#: shard window), and a journal view read by two threads at once would skip lines
_CACHE_LOCK = threading.RLock()
#: per run directory (resolved): ((inode, size, mtime_ns, ctime_ns) of ``state.json``, its parsed content)
_STATES: dict[str, tuple[tuple[int, int, int, int], dict[str, Any]]] = {}


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

    def estimate_parts_dir(self, kind: str) -> Path:
        """Scratch of the estimate stage of one kind: each part's up pass and rows, removed when the
        stage's files are written (``pipeline.job.estimate``)."""
        return self.root / "estimates" / kind / "parts"

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

    @property
    def journal_path(self) -> Path:
        """Per-shard completion records (``shards.jsonl``; see the module docstring)."""
        return self.root / "shards.jsonl"

    def state(self) -> dict[str, Any]:
        """The run's state: ``state.json`` with the shard records of ``shards.jsonl`` merged into
        ``done`` and ``files`` (fresh ``done``/``files`` dicts; treat the rest as read-only)."""
        st = self._state_file()
        journal = self._journal()
        return {**st, "done": {**st["done"], **journal.done}, "files": {**st.get("files", {}), **journal.files}}

    def _key(self) -> str:
        return str(self.root.resolve())

    def _state_file(self) -> dict[str, Any]:
        """``state.json`` parsed, re-read only when the file changed (every update replaces it,
        so a new inode, size or time says so). Shared between calls: never modify it."""
        with _CACHE_LOCK:
            return self._state_file_locked()

    def _state_file_locked(self) -> dict[str, Any]:
        st = os.stat(self.state_path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = _STATES.get(self._key())
        if cached is not None and cached[0] == stamp:
            return cached[1]
        parsed = json.loads(self.state_path.read_bytes())
        _STATES[self._key()] = (stamp, parsed)
        return parsed

    def _journal(self) -> _Journal:
        """This process's view of ``shards.jsonl``, brought up to date by reading only the
        complete lines appended since the last call."""
        with _CACHE_LOCK:
            return self._journal_locked()

    def _journal_locked(self) -> _Journal:
        key = self._key()
        j = _JOURNALS.get(key)
        try:
            st = os.stat(self.journal_path)
        except FileNotFoundError:
            j = _JOURNALS[key] = _Journal()
            return j
        if j is None or j.inode != st.st_ino or st.st_size < j.offset:
            j = _JOURNALS[key] = _Journal(inode=st.st_ino)
        if st.st_size > j.offset:
            with open(self.journal_path, "rb") as fh:
                fh.seek(j.offset)
                data = fh.read(st.st_size - j.offset)
            end = data.rfind(b"\n") + 1  # a line without its newline is not (yet) a record
            for line in data[:end].splitlines():
                try:
                    rec = json.loads(line)
                    j.done[rec["stage"]] = rec["info"]
                    j.files.update(rec["files"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise RunDirIntegrityError(f"{self.journal_path}: a damaged shard record ({exc}); the run "
                                               "directory was changed, the run stops") from None
            j.offset += end
        return j

    def _append_journal(self, stage: str, info: dict[str, Any], sums: dict[str, str]) -> None:
        """Append one shard record (under the state lock). A last line cut short by a kill is
        removed first, so every line in the file is whole."""
        line = json.dumps({"stage": stage, "info": info, "files": sums}, sort_keys=True, default=str) + "\n"
        data = line.encode()
        fd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            if size and os.pread(fd, 1, size - 1) != b"\n":
                tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
                cut = max(0, size - len(tail)) + tail.rfind(b"\n") + 1
                os.ftruncate(fd, cut)
                size = cut
            half = len(data) // 2
            os.pwrite(fd, data[:half], size)
            crash_point(f"mid-write:{self.journal_path.name}")
            os.pwrite(fd, data[half:], size + half)
            os.fsync(fd)
        finally:
            os.close(fd)

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
        self.verified_sha256(path)
        return Path(path)

    def verified_sha256(self, path: Path) -> str:
        """The sha256 of ``path``, checked as in :meth:`verified` (a key for what is built from it)."""
        path = Path(path)
        want = self._recorded(path)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        got = _VERIFIED.get(key) or sha256_file(path)
        self._same(path, got, want)
        _VERIFIED[key] = got
        return got

    def copy_verified(self, path: Path, dst: Path) -> str:
        """Copy ``path`` to a new file ``dst`` and return its sha256, checked as in
        :meth:`verified` on the bytes as they are copied (one read of the file, not a check and
        then a copy). A copy that fails the check is removed."""
        path, dst = Path(path), Path(dst)
        want = self._recorded(path)
        got = copy_file_sha256(path, dst)
        try:
            self._same(path, got, want)
        except RunDirIntegrityError:
            dst.unlink(missing_ok=True)
            raise
        return got

    def _recorded(self, path: Path) -> str:
        """The sha256 a finished stage recorded for ``path``, which must exist."""
        rel = self._rel(path)
        want = self._journal().files.get(rel) or self._state_file().get("files", {}).get(rel)
        if want is None:
            raise RunDirIntegrityError(f"{path}: not recorded as written by a finished stage of this run")
        if not path.exists():
            raise RunDirIntegrityError(f"{path}: missing — a finished stage wrote it (sha256 {want[:12]}…); "
                                       "the run directory was changed, the run stops")
        return str(want)

    @staticmethod
    def _same(path: Path, got: str, want: str) -> None:
        if got != want:
            raise RunDirIntegrityError(f"{path}: changed since its stage finished (sha256 {got[:12]}… instead of "
                                       f"{want[:12]}…); the run stops")

    def is_done(self, stage: str) -> bool:
        return self.done_info(stage) is not None

    def done_info(self, stage: str) -> dict[str, Any] | None:
        if stage.startswith(JOURNALED):
            return self._journal().done.get(stage)
        return self._state_file()["done"].get(stage)

    def mark_done(self, stage: str, info: dict[str, Any] | None = None, files: Sequence[Path] = ()) -> None:
        """Record ``stage`` as complete with the sha256 of the ``files`` it wrote (call only
        after its outputs are in place)."""
        crash_point(f"before:{stage}")
        sums = {self._rel(f): sha256_file(f) for f in files}  # hashed outside the lock
        record = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
        with self._locked():
            if stage.startswith(JOURNALED):
                self._append_journal(stage, record, sums)
                return
            st = json.loads(self.state_path.read_bytes())  # read-modify-write: never a cached copy
            st["done"][stage] = record
            st.setdefault("files", {}).update(sums)
            write_json_atomic(self.state_path, st)

    def update(self, **fields: Any) -> None:
        with self._locked():
            st = json.loads(self.state_path.read_bytes())
            st.update(fields)
            write_json_atomic(self.state_path, st)
