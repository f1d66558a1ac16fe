"""Top-down post-processing: exact-constraint weighted least squares and controlled rounding.

Public entry points: :func:`solve_root`, :func:`solve_level` (``topdown.py``),
:func:`solve_parent` (``parent.py``), :class:`ParentProblem` and :class:`LevelBatch`
(``problem.py``); the engine's seam, :class:`Solver`, :func:`plan` and :class:`SolveOptions`
(``solver.py``).
"""

from pipeline.postprocess.diagnostics import LevelDiagnostics, ParentStats
from pipeline.postprocess.parent import solve_parent
from pipeline.postprocess.problem import LevelBatch, ParentProblem, PostprocessError
from pipeline.postprocess.solver import (
    AdmmSolver,
    SolveOptions,
    Solver,
    Thresholds,
    plan,
)
from pipeline.postprocess.topdown import (
    RangeJob,
    serial_map,
    solve_level,
    solve_range,
    solve_root,
)

__all__ = [
    "AdmmSolver", "LevelBatch", "LevelDiagnostics", "ParentProblem", "ParentStats",
    "PostprocessError", "RangeJob", "SolveOptions", "Solver", "Thresholds", "plan", "serial_map",
    "solve_level", "solve_parent", "solve_range", "solve_root",
]
