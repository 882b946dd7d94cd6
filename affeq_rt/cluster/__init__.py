"""Executors for clusters (Ray today): any pass of the engine spread over worker processes.

``RayExecutor`` is passed as ``executor=`` (``fit``: ``FitOptions(executor=…)``); results equal a
local run (docs/SCALING.md). Ray itself is optional: ``pip install 'affeq-rt[ray]'``.
"""

from affeq_rt.cluster.ray import EXECUTORS, RayExecutor, executor_for, import_ray

__all__ = ["EXECUTORS", "RayExecutor", "executor_for", "import_ray"]
