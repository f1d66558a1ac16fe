"""Operator actions on the privacy ledger for runs: what was spent, and giving back the ρ of a
run whose noise never left its run directory (``dptab ledger``)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline.job.context import RunContext
from pipeline.privacy.ledger import Ledger, LedgerError


def ledger_summary(ledger_path: str | Path, dataset: str | None = None) -> list[dict[str, Any]]:
    """Per dataset: lifetime ρ, spent ρ (reserved + committed), and every release row."""
    path = Path(ledger_path)
    if not path.is_file():
        raise LedgerError(f"{path}: no ledger at this path")
    led = Ledger(path)
    rows = led.entries(dataset)
    out = []
    for ds in sorted({r["dataset"] for r in rows}):
        out.append({"dataset": ds, "lifetime_rho": str(led.lifetime(ds)), "spent_rho": str(led.spent(ds)),
                    "releases": [r for r in rows if r["dataset"] == ds]})
    return out


def fail_run(run_dir: str | Path) -> dict[str, Any]:
    """Mark a run's reservation failed, so its ρ stops counting — only if nothing derived from
    its noise ever left the run directory. Refused when the run published (or began writing a
    release folder: even a hidden partial folder is outside the run directory), or when the
    ledger already counts it as committed. The run can never be resumed afterwards."""
    ctx = RunContext.load(run_dir)
    st = ctx.state
    release_id = str(st["release_id"])
    releases = ctx.cfg.output.releases_dir
    if ctx.rd.is_done("publish") or (releases / release_id).exists():
        raise LedgerError(f"run {ctx.rd.root} published release {release_id!r}; its ρ stays spent")
    if st.get("publish_started"):
        raise LedgerError(f"run {ctx.rd.root} began publishing at {st['publish_started']}: data derived from its "
                          "noise may have left the run directory, so its ρ stays spent. Resume the run to finish it.")
    partial = sorted(releases.glob(f".{release_id}.tmp-*"))
    if partial:
        raise LedgerError(f"run {ctx.rd.root} began writing its release ({partial[0]}): data derived from its "
                          "noise left the run directory, so its ρ stays spent. Resume the run to finish it.")
    led = Ledger.open_existing(ctx.cfg.privacy.ledger, st.get("ledger_id"))  # type: ignore[arg-type]
    status = led.status(ctx.cfg.dataset_id, release_id)
    if status == "committed":
        raise LedgerError(f"release {release_id!r} is committed in the ledger; its ρ stays spent")
    if status is None:
        raise LedgerError(f"release {release_id!r} of dataset {ctx.cfg.dataset_id!r} has no reservation "
                          f"in {ctx.cfg.privacy.ledger}; nothing to give back")
    ctx.rd.update(ledger_failed=True)  # first: a resume after this point is refused
    led.fail(ctx.cfg.dataset_id, release_id)
    return {"dataset": ctx.cfg.dataset_id, "release": release_id, "rho_released": str(Fraction(str(st["rho"]))),
            "spent_now": str(led.spent(ctx.cfg.dataset_id))}
