"""The work list of a run: which (kind, level, shards) steps, in which order.

One place decides the order of the top-down job (ARCHITECTURE §1): for each run kind, the levels
top to bottom; within a level, the shards of parents, which are independent of each other.
``dptab run``, the Prefect flow and the experiment all iterate :func:`plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.job.context import RunContext
from pipeline.job.sizing import level_shard_bounds


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


def shard_bounds(ctx: RunContext, level: str) -> np.ndarray:
    """Parent-index boundaries of the shards of ``level``, int64 ``(n_shards + 1,)``: a shard is a
    contiguous range of parents whose children x cells add up to about
    ``execution.shard_target_cells`` (10–120 s of work); see
    :func:`pipeline.job.sizing.level_shard_bounds`."""
    return level_shard_bounds(ctx.geography, level, ctx.persons_spec.n_cells, ctx.cfg.execution.shard_target_cells)


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
