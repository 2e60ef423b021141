"""`nibble plan`: what quantizing each linear module alone costs in KLD and saves in bytes
(scan.py, measured against reference.py's kept pass, recorded in results.py), the per-module
formats of least summed KLD within a weight budget, written as a config (budget.py), and the
scan's plot (plot.py)."""

from engine.sensitivity.budget import Plan, plan, plan_rules, write_plan
from engine.sensitivity.results import Scan, format_table
from engine.sensitivity.scan import fixed_bytes, module_groups, scan

__all__ = ["Plan", "Scan", "fixed_bytes", "format_table", "module_groups", "plan", "plan_rules",
           "scan", "write_plan"]
