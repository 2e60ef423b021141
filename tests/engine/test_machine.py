"""Machine facts: the memory a process may use, under cgroup v1 and v2 limits."""

from __future__ import annotations

import os

from engine.machine import memory_limit_bytes

PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_limit_on_the_process_or_an_ancestor(tmp_path):
    root, me = tmp_path / "cg", tmp_path / "self"
    me.write_text("0::/pod/app\n")
    _write(root / "pod" / "app" / "memory.max", "max")
    assert memory_limit_bytes(root, me) == PHYSICAL  # "max": no limit
    _write(root / "pod" / "memory.max", str(2 * 2**30))
    assert memory_limit_bytes(root, me) == min(PHYSICAL, 2 * 2**30)
    _write(root / "pod" / "app" / "memory.max", str(2**30))
    assert memory_limit_bytes(root, me) == min(PHYSICAL, 2**30)


def test_cgroup_v1_memory_controller(tmp_path):
    root, me = tmp_path / "cg", tmp_path / "self"
    me.write_text("5:cpu,cpuacct:/x\n\n4:memory:/docker/a:b\n0::/\n")  # a blank line, a colon
    # v1 writes a huge number where nothing is set
    _write(root / "memory" / "docker" / "a:b" / "memory.limit_in_bytes", str(2**63 - 4096))
    assert memory_limit_bytes(root, me) == PHYSICAL
    _write(root / "memory" / "docker" / "memory.limit_in_bytes", str(3 * 2**30))  # an ancestor
    assert memory_limit_bytes(root, me) == min(PHYSICAL, 3 * 2**30)


def test_no_cgroup_information_means_physical_memory(tmp_path):
    assert memory_limit_bytes(tmp_path, tmp_path / "missing") == PHYSICAL
    assert memory_limit_bytes() <= PHYSICAL
