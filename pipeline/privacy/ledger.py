"""Lifetime privacy-budget ledger per dataset (SQLite).

One row per (dataset, release): ρ as exact fraction text, ε at δ (text, informational), time,
status ``reserved`` → ``committed`` (published) or ``failed``. The spent budget of a dataset is
the sum of ρ over its ``reserved`` and ``committed`` rows: a reservation counts from the moment
it is made, before any confidential data is read. Mark a reservation ``failed`` only when
nothing derived from its noise has left the confidential run directory.

Concurrency: every check-and-reserve runs inside ``BEGIN IMMEDIATE``, which takes SQLite's
write lock before reading the spent total, so two processes cannot both read the same total and
both reserve: the second waits (up to ``timeout`` seconds) and then sees the first one's row.

Idempotence: reserving the same (dataset, release) again by the same run (its ``run`` token,
kept in the run directory) with the same ρ is a no-op — a retried or resumed run does not count
twice. The same release id from another run (another runs directory, a re-run after archiving)
is refused: two differently-noised releases under one ledger row would count one spend.

Identity: each ledger file holds a random ``ledger_id`` made at creation. A run records it;
resuming or publishing a run opens the ledger with :meth:`Ledger.open_existing`, which fails if
the file is gone or was replaced — a ledger that disappears stops the run, it is never silently
recreated empty.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator

from pipeline.errors import DptabError, RefusedError


class LedgerError(RefusedError):
    """The ledger refuses an operation (inconsistent release, unknown reservation, ...)."""


class BudgetExceededError(LedgerError):
    """Reserving this release would push the dataset over its declared lifetime budget."""


class LedgerMissingError(DptabError):
    """The ledger a run reserved its budget in is gone or was replaced: the run stops (exit 1)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    dataset TEXT PRIMARY KEY,
    lifetime_rho TEXT NOT NULL,
    declared TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS spends (
    dataset TEXT NOT NULL,
    release TEXT NOT NULL,
    rho TEXT NOT NULL,
    eps TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'failed')),
    PRIMARY KEY (dataset, release)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fmt(x: Fraction) -> str:
    return f"{x} (≈ {float(x):.6g})"


class Ledger:
    """The SQLite ledger at ``path`` (created on first use, parent directories too)."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = self._connect()
            try:
                con.executescript(_SCHEMA)  # idempotent
            finally:
                con.close()
        except (sqlite3.DatabaseError, OSError) as exc:
            raise LedgerError(f"{self.path}: not a usable privacy ledger ({exc}); privacy.ledger must name a "
                              "SQLite ledger file, or a new file in a writable folder") from None
        with self._tx() as con:
            cols = [r[1] for r in con.execute("PRAGMA table_info(spends)")]
            if "run" not in cols:  # a ledger made before runs were recorded
                con.execute("ALTER TABLE spends ADD COLUMN run TEXT")
            if con.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone() is None:
                con.execute("INSERT INTO meta VALUES ('ledger_id', ?)", (secrets.token_hex(16),))

    @classmethod
    def open_existing(cls, path: str | Path, ledger_id: str | None, timeout: float = 60.0) -> "Ledger":
        """The ledger a run reserved in: it must still exist and be the same file (``ledger_id``).
        Raises :class:`LedgerMissingError` otherwise — never creates a new, empty ledger."""
        path = Path(path)
        if not path.is_file():
            raise LedgerMissingError(f"the privacy ledger {path} is gone; this run's spend was recorded there. "
                                     "Restore it from a backup before resuming; the run stops here")
        led = cls(path, timeout)
        if ledger_id is not None and led.ledger_id != ledger_id:
            raise LedgerMissingError(f"the privacy ledger {path} was replaced (id {led.ledger_id}, the run "
                                     f"reserved in {ledger_id}); restore the original before resuming")
        return led

    @property
    def ledger_id(self) -> str:
        """The random identity of this ledger file, made when it was created."""
        con = self._connect()
        try:
            return str(con.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()[0])
        finally:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        con.execute("PRAGMA busy_timeout = %d" % int(self.timeout * 1000))
        return con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): commit on success, roll back on error."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @staticmethod
    def _spent(con: sqlite3.Connection, dataset: str, exclude: str | None = None) -> Fraction:
        rows = con.execute(
            "SELECT release, rho FROM spends WHERE dataset = ? AND status IN ('reserved', 'committed')",
            (dataset,),
        ).fetchall()
        return sum((Fraction(r) for rel, r in rows if rel != exclude), Fraction(0))

    def check_budget(self, dataset: str, rho: Fraction, lifetime_rho: Fraction) -> Fraction:
        """Raise :class:`BudgetExceededError` if ``rho`` more would exceed the dataset's lifetime
        budget (read only; :meth:`check_and_reserve` checks again atomically). Returns the spent
        total. Used before any data is read."""
        rho, lifetime_rho = Fraction(rho), Fraction(lifetime_rho)
        con = self._connect()
        try:
            row = con.execute("SELECT lifetime_rho FROM datasets WHERE dataset = ?", (dataset,)).fetchone()
            if row is not None and Fraction(row[0]) != lifetime_rho:
                raise LedgerError(
                    f"dataset {dataset!r} was declared with lifetime rho {row[0]}; this run declares "
                    f"{lifetime_rho}. The lifetime budget of a dataset cannot be changed by a run.")
            spent = self._spent(con, dataset)
        finally:
            con.close()
        if spent + rho > lifetime_rho:
            raise BudgetExceededError(
                f"privacy budget exceeded for dataset {dataset!r}: spent {_fmt(spent)} + this run "
                f"{_fmt(rho)} = {_fmt(spent + rho)} > lifetime {_fmt(lifetime_rho)}; refused before reading any data")
        return spent

    def check_and_reserve(self, dataset: str, release: str, rho: Fraction,
                          lifetime_rho: Fraction, eps: str | None = None, run: str | None = None) -> Fraction:
        """Reserve ``rho`` for ``release`` of ``dataset`` or raise :class:`BudgetExceededError`.

        ``run``: the reserving run's token (kept in its run directory). A reservation of the
        same release by the same run is a no-op; by another run (or with another ρ) it is
        refused, whatever its status. Returns the dataset's spent total after the reservation.
        The lifetime budget is fixed at the dataset's first reservation; a later call declaring
        a different one is refused.
        """
        rho, lifetime_rho = Fraction(rho), Fraction(lifetime_rho)
        if rho <= 0 or lifetime_rho <= 0:
            raise LedgerError(f"rho and lifetime_rho must be > 0 (got {rho}, {lifetime_rho})")
        with self._tx() as con:
            row = con.execute("SELECT lifetime_rho FROM datasets WHERE dataset = ?", (dataset,)).fetchone()
            if row is None:
                con.execute("INSERT INTO datasets VALUES (?, ?, ?)", (dataset, str(lifetime_rho), _now()))
            elif Fraction(row[0]) != lifetime_rho:
                raise LedgerError(
                    f"dataset {dataset!r} was declared with lifetime rho {row[0]}; this run declares "
                    f"{lifetime_rho}. The lifetime budget of a dataset cannot be changed by a run."
                )
            existing = con.execute(
                "SELECT rho, status, run FROM spends WHERE dataset = ? AND release = ?", (dataset, release)
            ).fetchone()
            if existing is not None and Fraction(existing[0]) != rho:
                raise LedgerError(
                    f"release {release!r} of dataset {dataset!r} already holds rho {existing[0]}; "
                    f"cannot reserve a different rho {rho} under the same release id"
                )
            # only the run holding the row (its token) may re-reserve it: a resume or retry
            if existing is not None and (run is None or existing[2] != run):
                raise LedgerError(
                    f"release id {release!r} of dataset {dataset!r} was already used by another run "
                    f"({existing[1]}); a release id is used once — choose a new one"
                )
            if existing is not None and existing[1] == "failed":
                raise LedgerError(
                    f"release {release!r} of dataset {dataset!r} was marked failed (its noise never "
                    "published); the run cannot continue — start a new run with a new release id"
                )
            if existing is not None:
                return self._spent(con, dataset)  # retry / resume of the same run: already counted
            spent = self._spent(con, dataset, exclude=release)
            if spent + rho > lifetime_rho:
                raise BudgetExceededError(
                    f"privacy budget exceeded for dataset {dataset!r}: spent {_fmt(spent)} + "
                    f"this release {release!r} {_fmt(rho)} = {_fmt(spent + rho)} > lifetime "
                    f"{_fmt(lifetime_rho)}; refused before reading any data"
                )
            now = _now()
            con.execute("INSERT INTO spends (dataset, release, rho, eps, created, updated, status, run) "
                        "VALUES (?, ?, ?, ?, ?, ?, 'reserved', ?)", (dataset, release, str(rho), eps, now, now, run))
            return spent + rho

    def _set_status(self, dataset: str, release: str, status: str, allowed: tuple[str, ...]) -> None:
        with self._tx() as con:
            row = con.execute("SELECT status FROM spends WHERE dataset = ? AND release = ?",
                              (dataset, release)).fetchone()
            if row is None:
                raise LedgerError(f"no reservation for release {release!r} of dataset {dataset!r}")
            if row[0] == status:
                return
            if row[0] not in allowed:
                raise LedgerError(f"release {release!r} of dataset {dataset!r} is {row[0]}; cannot mark it {status}")
            con.execute("UPDATE spends SET status = ?, updated = ? WHERE dataset = ? AND release = ?",
                        (status, _now(), dataset, release))

    def commit(self, dataset: str, release: str) -> None:
        """Mark a reservation committed (the release was published). Idempotent."""
        self._set_status(dataset, release, "committed", ("reserved",))

    def fail(self, dataset: str, release: str) -> None:
        """Mark a reservation failed (its ρ stops counting). Only for releases whose noise never
        left the confidential run directory; a committed release cannot be failed."""
        self._set_status(dataset, release, "failed", ("reserved",))

    def spent(self, dataset: str) -> Fraction:
        """Sum of ρ over the dataset's reserved and committed releases."""
        con = self._connect()
        try:
            return self._spent(con, dataset)
        finally:
            con.close()

    def _one(self, sql: str, args: tuple[str, ...]) -> object | None:
        """The first column of the first row of a read-only query, or None."""
        con = self._connect()
        try:
            row = con.execute(sql, args).fetchone()
        finally:
            con.close()
        return None if row is None else row[0]

    def status(self, dataset: str, release: str) -> str | None:
        """``reserved`` / ``committed`` / ``failed``, or None if the release has no row."""
        v = self._one("SELECT status FROM spends WHERE dataset = ? AND release = ?", (dataset, release))
        return None if v is None else str(v)

    def holder(self, dataset: str, release: str) -> str | None:
        """The run token that holds the release's row (None: no row, or a row without a token)."""
        v = self._one("SELECT run FROM spends WHERE dataset = ? AND release = ?", (dataset, release))
        return None if v is None else str(v)

    def lifetime(self, dataset: str) -> Fraction | None:
        """The dataset's declared lifetime ρ, or None if it has no reservation yet."""
        v = self._one("SELECT lifetime_rho FROM datasets WHERE dataset = ?", (dataset,))
        return None if v is None else Fraction(str(v))

    def entries(self, dataset: str | None = None) -> list[dict[str, str]]:
        """All rows (optionally of one dataset) as dicts, oldest first."""
        con = self._connect()
        try:
            q = "SELECT dataset, release, rho, eps, created, updated, status FROM spends"
            args: tuple = ()
            if dataset is not None:
                q += " WHERE dataset = ?"
                args = (dataset,)
            cols = ("dataset", "release", "rho", "eps", "created", "updated", "status")
            return [dict(zip(cols, r)) for r in con.execute(q + " ORDER BY created, release", args)]
        finally:
            con.close()
