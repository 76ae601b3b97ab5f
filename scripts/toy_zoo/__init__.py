"""Toy model zoo: a tiny Llama base and three skill experts that build offline on 2 CPU cores.

Entry points: :func:`build_zoo` (see ``scripts/build_zoo.py`` for the CLI) and
:class:`TaskArithmetic` (merges through merge_core). The toy lm-eval tasks live in ``eval_tasks/`` at the repo root.
"""

from .build import MODELS, Zoo, build_zoo, read_stamp
from .matrix import check_matrix, format_matrix
from .merge import TaskArithmetic, task_arithmetic_recipe
from .settings import ZooSettings
from .tasks import write_task_data

__all__ = ["MODELS", "Zoo", "ZooSettings", "build_zoo", "check_matrix", "format_matrix",
           "read_stamp", "TaskArithmetic", "task_arithmetic_recipe", "write_task_data"]
