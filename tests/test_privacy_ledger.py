"""Budget ledger: refusal with the arithmetic, idempotent reservations, concurrency safety."""

from __future__ import annotations

import multiprocessing as mp
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline.privacy.ledger import BudgetExceededError, Ledger, LedgerError


def test_reserve_commit_fail_and_refusal(tmp_path: Path):
    led = Ledger(tmp_path / "ledger.sqlite")
    assert led.check_and_reserve("ds", "r1", Fraction(1), Fraction(3), eps="10.0") == 1
    assert led.check_and_reserve("ds", "r2", Fraction(3, 2), Fraction(3)) == Fraction(5, 2)
    with pytest.raises(BudgetExceededError) as err:
        led.check_and_reserve("ds", "r3", Fraction(1), Fraction(3))
    msg = str(err.value)
    assert "spent 5/2" in msg and "this release 'r3' 1" in msg and "= 7/2" in msg and "> lifetime 3" in msg
    assert led.spent("ds") == Fraction(5, 2)  # the refused release left no row
    led.commit("ds", "r1")
    led.commit("ds", "r1")  # idempotent
    led.fail("ds", "r2")
    assert led.spent("ds") == 1
    with pytest.raises(LedgerError, match="committed"):
        led.fail("ds", "r1")
    with pytest.raises(LedgerError, match="no reservation"):
        led.commit("ds", "nope")
    assert led.check_and_reserve("ds", "r3", Fraction(2), Fraction(3)) == 3  # exactly at the limit
    assert led.spent("other") == 0
    rows = {r["release"]: r for r in led.entries("ds")}
    assert rows["r1"]["status"] == "committed" and rows["r1"]["rho"] == "1" and rows["r1"]["eps"] == "10.0"
    assert rows["r2"]["status"] == "failed"


def test_same_release_does_not_double_count(tmp_path: Path):
    led = Ledger(tmp_path / "l.sqlite")
    led.check_and_reserve("ds", "r1", Fraction(2), Fraction(3), run="tok-a")
    assert led.check_and_reserve("ds", "r1", Fraction(2), Fraction(3), run="tok-a") == 2  # retry / resume
    led.commit("ds", "r1")
    assert Ledger(tmp_path / "l.sqlite").check_and_reserve("ds", "r1", Fraction(2), Fraction(3), run="tok-a") == 2
    with pytest.raises(LedgerError, match="different rho"):
        led.check_and_reserve("ds", "r1", Fraction(1), Fraction(3), run="tok-a")


def test_a_release_id_is_used_by_one_run_only(tmp_path: Path):
    """Another run (another runs directory, a re-run after archiving) may not reuse a release
    id: two differently-noised releases would be counted as one spend."""
    led = Ledger(tmp_path / "l.sqlite")
    led.check_and_reserve("ds", "R1", Fraction(1), Fraction(10), run="first")
    with pytest.raises(LedgerError, match="already used by another run"):
        led.check_and_reserve("ds", "R1", Fraction(1), Fraction(10), run="second")
    with pytest.raises(LedgerError, match="already used by another run"):
        led.check_and_reserve("ds", "R1", Fraction(1), Fraction(10))
    led.commit("ds", "R1")
    with pytest.raises(LedgerError, match="already used by another run"):
        led.check_and_reserve("ds", "R1", Fraction(1), Fraction(10), run="third")
    assert led.spent("ds") == 1


def test_a_failed_release_cannot_come_back(tmp_path: Path):
    """Marking a run failed stops its ρ counting, so the run may never publish afterwards."""
    led = Ledger(tmp_path / "l.sqlite")
    led.check_and_reserve("ds", "r2", Fraction(1), Fraction(3), run="t")
    led.fail("ds", "r2")
    assert led.spent("ds") == 0
    with pytest.raises(LedgerError, match="marked failed"):
        led.check_and_reserve("ds", "r2", Fraction(1), Fraction(3), run="t")
    with pytest.raises(LedgerError, match="failed"):
        led.commit("ds", "r2")


def test_a_vanished_or_replaced_ledger_stops_the_run(tmp_path: Path):
    from pipeline.privacy.ledger import LedgerMissingError

    path = tmp_path / "l.sqlite"
    led = Ledger(path)
    ident = led.ledger_id
    assert Ledger.open_existing(path, ident).ledger_id == ident
    path.unlink()
    with pytest.raises(LedgerMissingError, match="gone"):
        Ledger.open_existing(path, ident)
    assert not path.exists()  # never silently recreated
    Ledger(path)  # someone makes a new, empty one
    with pytest.raises(LedgerMissingError, match="replaced"):
        Ledger.open_existing(path, ident)


def test_lifetime_cannot_be_changed_by_a_run(tmp_path: Path):
    led = Ledger(tmp_path / "l.sqlite")
    led.check_and_reserve("ds", "r1", Fraction(1), Fraction(3))
    with pytest.raises(LedgerError, match="cannot be changed"):
        led.check_and_reserve("ds", "r2", Fraction(1), Fraction(100))
    with pytest.raises(LedgerError, match="> 0"):
        led.check_and_reserve("ds2", "r", Fraction(0), Fraction(1))


def _slow_spent(con, dataset, exclude=None):
    import time

    out = _REAL_SPENT(con, dataset, exclude)
    time.sleep(0.3)
    return out


_REAL_SPENT = Ledger._spent


def _reserve(path: str, release: str, start, results) -> None:
    # Runs in a spawned child. The read of the spent total is slowed down so that, without the
    # write lock that BEGIN IMMEDIATE takes before that read, both processes would read 0 and
    # both reserve (the test fails if the transaction is made DEFERRED).
    Ledger._spent = staticmethod(_slow_spent)
    start.wait()
    try:
        Ledger(path).check_and_reserve("ds", release, Fraction(3, 5), Fraction(1))
        results.put((release, "ok"))
    except BudgetExceededError:
        results.put((release, "refused"))
    except Exception as exc:  # reported to the parent instead of a bare exit code
        results.put((release, f"error: {exc!r}"))


@pytest.mark.parametrize("trial", range(2))
def test_two_processes_cannot_both_overspend(tmp_path: Path, trial: int):
    # each asks for 3/5 of a lifetime of 1: exactly one may succeed
    path = str(tmp_path / "l.sqlite")
    Ledger(path)
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_reserve, args=(path, f"r{i}", start, results)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcome = sorted(results.get(timeout=5)[1] for _ in procs)
    assert outcome == ["ok", "refused"]
    assert Ledger(path).spent("ds") == Fraction(3, 5)
