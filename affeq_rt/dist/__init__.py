"""Distributed executors for the long commands (``extract``, ``fit``, ``evaluate``): Ray today.

``RayExecutor`` is passed as ``executor=`` (``fit``: ``FitOptions(executor=…)``); results equal a
local run (docs/SCALING.md). Ray itself is optional: ``pip install 'affeq-rt[ray]'``.
"""

from affeq_rt.dist.executor import EXECUTORS, RayExecutor, executor_for, import_ray

__all__ = ["EXECUTORS", "RayExecutor", "executor_for", "import_ray"]
