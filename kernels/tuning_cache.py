"""Kernel choices measured on this machine, kept on disk so every process makes the same ones.

Where a kernel path is chosen by timing candidates (the CPU dispatch in kernels/cpu.py, the
Triton plans in kernels/triton/tuning.py), the first process to meet a layer shape measures
and writes the winner to a JSON file under $NIBBLE_CACHE/tuning/ (default
~/.cache/nibble/tuning/), one file per CPU or GPU model; later processes read it instead of
timing again. That makes the choice reproducible: two processes on one machine (a server and
`nibble compare`, say) run the same kernels and so compute the same numbers, and a busy
moment at load no longer flips a choice. NIBBLE_RETUNE=1 measures again and overwrites
what is stored; deleting the file does the same for everything.

A file that cannot be read counts as empty and one that cannot be written is logged once:
choices then live for the process only, as before this cache existed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("nibble.kernels")

_WRITE_FAILED: set[Path] = set()


def root() -> Path:
    """$NIBBLE_CACHE/tuning, else $XDG_CACHE_HOME/nibble/tuning, else ~/.cache/nibble/tuning."""
    base = os.environ.get("NIBBLE_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nibble"
    return Path(base).expanduser() / "tuning"


def file_for(machine: str) -> Path:
    """The cache file of one CPU or GPU model (its name made safe for a file name)."""
    return root() / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', machine).strip('-') or 'unknown'}.json"


def retune() -> bool:
    """NIBBLE_RETUNE=1: ignore stored choices, measure again and store the new ones."""
    return os.environ.get("NIBBLE_RETUNE") == "1"


def read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store(path: Path, key: str, value: object) -> None:
    """Adds or replaces one entry; the file is rewritten whole through a temporary file, so a
    reader never sees half of it (two processes storing at once may drop one entry, which
    the next process then measures again)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**read(path), key: value}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        if path not in _WRITE_FAILED:
            _WRITE_FAILED.add(path)
            log.warning("cannot store kernel choices in %s (%s); they hold for this process "
                        "only (set NIBBLE_CACHE to a writable directory)", path, exc)
