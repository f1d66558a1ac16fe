"""Top-down post-processing: exact-constraint weighted least squares and controlled rounding.

Public entry points: :func:`solve_root`, :func:`solve_level`, :func:`run_topdown`
(``topdown.py``), :func:`solve_parent` (``parent.py``), :class:`ParentProblem` and
:class:`LevelBatch` (``problem.py``).
"""

from pipeline.postprocess.diagnostics import LevelDiagnostics, ParentStats
from pipeline.postprocess.parent import SolveOptions, solve_parent
from pipeline.postprocess.problem import LevelBatch, ParentProblem, PostprocessError
from pipeline.postprocess.topdown import LevelInput, run_topdown, solve_level, solve_root

__all__ = [
    "LevelBatch", "LevelDiagnostics", "LevelInput", "ParentProblem", "ParentStats",
    "PostprocessError", "SolveOptions", "run_topdown", "solve_level", "solve_parent", "solve_root",
]
