"""The CPU kernel tests again under every CPU capability below this machine's own.

PyTorch's CPU ops pick their code (and the int4 op its weight layout) by the capability ATen
dispatches to: AVX512 on a Xeon with AVX-512, AVX2 on an AVX2-only EPYC, DEFAULT where there
is neither. ATEN_CPU_CAPABILITY changes it; ATen takes even a value the CPU cannot run, and its
ops then die of an illegal instruction, so only lower ones are used here. The suite runs
tests/kernels/test_cpu.py natively; this runs it once more in a subprocess for each lower
capability, so an AVX-512 machine tests the AVX2 and DEFAULT code paths too and an AVX2
machine the DEFAULT one (the AVX-512 layout is checked everywhere through test_cpu.py's
pack_like_torch, and against the real packer on AVX-512 machines).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["DEFAULT", "AVX2", "AVX512"]
NATIVE = torch.backends.cpu.get_cpu_capability()
# Empty only where the CPU has no vector ISA PyTorch uses (or is not x86): never on CI.
LOWER = ORDER[: ORDER.index(NATIVE)] if NATIVE in ORDER else []

RUN = """
import sys, torch, pytest
print("capability:", torch.backends.cpu.get_cpu_capability(), flush=True)
# nibble's native int4 kernel does not depend on ATen's capability: run once, in test_cpu.py
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-k", "not cpu-native",
                      "tests/kernels/test_cpu.py"]))
"""


@pytest.mark.parametrize("capability", LOWER)
def test_cpu_kernels_under_a_lower_capability(capability):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    proc = subprocess.run([sys.executable, "-c", RUN], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert f"capability: {capability}\n" in proc.stdout, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert " passed" in proc.stdout, out[-3000:]
