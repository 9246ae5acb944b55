"""lingua.plan: a run's memory, FLOPs, communication and time at any world size, before it runs
(`python -m lingua.plan --help`; README "Planning a run")."""

from lingua.plan.plan import Plan, plan
from lingua.plan.report import format_plan

__all__ = ["Plan", "format_plan", "plan"]
