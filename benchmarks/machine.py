"""Where benchmark results go; the machine facts recorded with them (engine/machine.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from engine.machine import machine_info  # noqa: F401 - the benchmarks import it from here

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(report: dict, out: Path | None, name: str, table: str) -> Path:
    """Writes the JSON (default results/<name>-<date>.json) and prints the markdown table."""
    out = out or RESULTS / f"{name}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"\nwrote {out}", file=sys.stderr)
    return out
