"""The layers of ARCHITECTURE.md, read from the source: engine/, kernels/ and loadtests/ never
import server/ (not even inside a function, where an import cycle hides until it runs), and
engine/ and kernels/ never import aiohttp or asyncio."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package, banned", [
    ("engine", ("server", "loadtests", "aiohttp", "asyncio")),
    ("kernels", ("server", "loadtests", "aiohttp", "asyncio")),
    ("loadtests", ("server",)),
])
def test_package_does_not_import_upper_layers(package, banned):
    found = [f"{path.relative_to(ROOT)} imports {name}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for name in sorted(imported_modules(path))
             if name.split(".")[0] in banned]
    assert not found, found
