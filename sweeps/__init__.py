"""Optuna hyperparameter sweeps over bench runs, and the built-in search spaces."""

from sweeps.driver import SweepRequest, SweepSummary, TrialRow, run_sweep
from sweeps.objective import Objective, parse_objectives
from sweeps.space import Param, Space, builtin_spaces, load_space

__all__ = ["Objective", "Param", "Space", "SweepRequest", "SweepSummary", "TrialRow",
           "builtin_spaces", "load_space", "parse_objectives", "run_sweep"]
