"""Running `nibble` as a user does: a real subprocess."""

from __future__ import annotations

import subprocess
import sys


def nibble(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """One clear message on stderr, exit 2, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("nibble: error:")
    for f in fragments:
        assert f in proc.stderr, proc.stderr
