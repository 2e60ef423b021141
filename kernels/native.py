"""nibble's own C++ CPU kernels (kernels/csrc/), compiled on first use.

PyTorch's int4 CPU op reads a row's weights once per row of x, so 16 decode rows cost 5x one
row; kernels/csrc/int4_cpu.cpp decodes each weight vector once per tile of 4 rows instead.
Its 8-bit activation path (rows rounded to int8 per block of 32, integer dot products) serves
the fused Llama decode step, which kernels/csrc also holds with the paged decode attention
and an int8 x int8 kernel for an int8 lm_head after that step. They are
built with torch.utils.cpp_extension (the system C++ compiler and ninja) into the virtual
environment (build_directory) the first time a process asks for them (`make setup` does that
once, about a minute on 2 cores); later processes load the built library in well under a
second.

`load()` returns the module, or None where it cannot serve: a CPU without AVX2 and FMA (the
kernel's instructions), NIBBLE_NATIVE=0, or a build that failed (logged once, with the
compiler's complaint). Callers then keep PyTorch's own ops, which are always correct.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("nibble.kernels")

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("bindings.cpp", "int4_cpu.cpp", "paged_attention_cpu.cpp",
                        "llama_decode_cpu.cpp", "int8_cpu.cpp", "w8a8_cpu.cpp")]
NAME = "nibble_cpu_kernels"


def cpuinfo(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field ("model name", "flags"), or None (not Linux,
    or no such field)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def supported() -> str | None:
    """Why the native kernels cannot run here, or None if they can."""
    if os.environ.get("NIBBLE_NATIVE") == "0":
        return "NIBBLE_NATIVE=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"a {platform.machine()} CPU (they are x86 AVX2 code)"
    missing = {"avx2", "fma"} - set((cpuinfo("flags") or "").split())
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    return None


@functools.cache
def source_digest() -> str:
    """A short hash of the kernels' sources: stored timings of these kernels (kernels.cpu)
    name it, so a changed kernel is measured again."""
    h = hashlib.sha256()
    for path in sorted(SOURCES[0].parent.iterdir()):  # the headers too
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def build_directory() -> Path | None:
    """Where the library is built: NIBBLE_KERNELS_DIR, else inside the virtual environment
    per PyTorch version (a build belongs to the PyTorch it was compiled against), else None
    (PyTorch's default cache) where that is not writable."""
    if os.environ.get("NIBBLE_KERNELS_DIR"):
        path = Path(os.environ["NIBBLE_KERNELS_DIR"])
    else:
        path = Path(sys.prefix) / "var" / "nibble-kernels" / f"torch-{torch.__version__}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; a virtual environment's own ninja (the PyPI
    package) is not on it unless the environment is activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (built on first call in any process), or None; see the module
    docstring."""
    why = supported()
    if why is not None:
        log.info("native CPU kernels off: %s", why)
        return None
    from torch.utils import cpp_extension

    _ninja_on_path()
    build = build_directory()
    if build is not None and not _wait_for_other_build(build / "lock"):
        return None
    start = time.perf_counter()
    try:
        # -fopenmp: at::parallel_for compiles to OpenMP regions on PyTorch's own thread pool
        module = cpp_extension.load(NAME, [str(s) for s in SOURCES],
                                    extra_cflags=["-O3", "-fopenmp"],
                                    build_directory=str(build) if build else None, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure: PyTorch's ops still serve
        log.warning("native CPU kernels could not be built (%s); using PyTorch's int4 op. "
                    "A C++ compiler and ninja are needed (pip install ninja).",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc))
        return None
    took = time.perf_counter() - start
    if took > 5:  # a compile, not a load of the cached library
        log.info("native CPU kernels: compiled in %.0f s (once per install and PyTorch version)",
                 took)
    return module


# How long a process waits for another one's build of the kernels (about a minute on 2 cores)
# before it serves with PyTorch's ops instead.
LOCK_WAIT_S = 300.0


def _wait_for_other_build(lock: Path) -> bool:
    """True once no other process holds the build directory's lock. cpp_extension waits for
    that lock forever, and a build that was killed (Ctrl-C, a timeout) leaves it behind: every
    later process would hang without a word. So wait here, saying why, and give up after
    LOCK_WAIT_S with the file to delete."""
    if not lock.exists():
        return True
    log.warning("native CPU kernels: another process is building them (%s exists); waiting up "
                "to %.0f s", lock, LOCK_WAIT_S)
    deadline = time.monotonic() + LOCK_WAIT_S
    while lock.exists() and time.monotonic() < deadline:
        time.sleep(min(1.0, LOCK_WAIT_S / 10))
    if lock.exists():
        log.warning("native CPU kernels: %s is still there after %.0f s; using PyTorch's ops. "
                    "If no build is running (one was interrupted), delete that file.",
                    lock, LOCK_WAIT_S)
        return False
    return True


def main() -> None:
    """`python -m kernels.native`: build now (what `make setup` runs) and say what happened."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mod = load()
    print("native CPU kernels:", "ready" if mod is not None else "not available (see above)",
          f"(torch {torch.__version__})")


if __name__ == "__main__":
    main()
