"""The work list of a run: which (kind, level, shards) steps, in which order.

One place decides the order of the top-down job (ARCHITECTURE §1): for each run kind, the levels
top to bottom; within a level, the shards of parents, which are independent of each other.
``dptab run``, the Prefect flow and the experiment all iterate :func:`plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.job.context import RunContext
from pipeline.model.geography import Geography


@dataclass(frozen=True)
class LevelStep:
    """One step of one run kind: its shards run independently, then the step is finished.

    ``action``: ``solve`` (measure if not yet measured, post-process, then merge the level),
    ``measure`` (only draw the level's measurements: the full estimator needs every level's
    before any is solved) or ``estimate`` (the full estimator's fit over all levels of the kind;
    one shard, ``level`` is ``"*"``).
    """

    kind: str
    level: str
    shards: tuple[int, ...]
    action: str = "solve"


def level_shard_bounds(geography: Geography, level: str, n_cells: int, target_cells: int) -> np.ndarray:
    """Parent-index boundaries of the shards of ``level``, int64 ``(n_shards + 1,)``: contiguous
    ranges of parents whose children x ``n_cells`` add up to about ``target_cells``; the top
    level is one shard. Depends only on the geography and the config (a resume finds the same)."""
    names = [lv.name for lv in geography.levels]
    i = names.index(level)
    if i == 0:
        return np.array([0, 1], dtype=np.int64)
    parent = geography.levels[i - 1]
    work = np.cumsum(np.diff(parent.child_ptr) * n_cells)
    cuts = np.searchsorted(work, np.arange(target_cells, work[-1], target_cells), side="left") + 1
    return np.unique(np.concatenate([[0], cuts, [parent.n_units]])).astype(np.int64)


def shard_bounds(ctx: RunContext, level: str) -> np.ndarray:
    """Parent-index boundaries of the shards of ``level``, int64 ``(n_shards + 1,)``: a shard is a
    contiguous range of parents whose children x cells add up to about
    ``execution.shard_target_cells`` (10–120 s of work); see
    :func:`level_shard_bounds`."""
    return level_shard_bounds(ctx.geography, level, ctx.persons_spec.n_cells, ctx.cfg.execution.shard_target_cells)


def shard_areas(geography: Geography, level: str, bounds: np.ndarray) -> list[str]:
    """Where each shard of ``level`` (parent-index ``bounds``, :func:`shard_bounds`) lies, for
    progress output: the codes of the second level's units (states, in the US) its parents
    belong to, ``"06"`` or ``"06-08"``; empty for the two top levels (the whole area)."""
    names = [lv.name for lv in geography.levels]
    i = names.index(level)
    if i < 2:
        return [""] * (len(bounds) - 1)
    levels = geography.levels
    top = np.arange(levels[i - 1].n_units)
    for k in range(i - 1, 1, -1):  # each parent's ancestor at the second level
        top = levels[k].parent[top]
    codes = levels[1].geoids
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        lo, hi = codes[top[a]], codes[top[b - 1]]
        out.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return out


def plan(ctx: RunContext) -> list[LevelStep]:
    """Every step of the run in execution order (after the inputs stage): per run kind, with
    ``postprocess.estimator: full`` first every level's measurements and the fit, then for
    every level top to bottom the solve."""
    steps = []
    for kind in ctx.kinds:
        shards = {level: tuple(range(len(shard_bounds(ctx, level)) - 1)) for level in ctx.level_names}
        if ctx.cfg.postprocess.estimator == "full":
            steps += [LevelStep(kind, level, shards[level], "measure") for level in ctx.level_names]
            steps.append(LevelStep(kind, "*", (0,), "estimate"))
        steps += [LevelStep(kind, level, shards[level]) for level in ctx.level_names]
    return steps
