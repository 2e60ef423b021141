"""Machine and version facts, recorded with every benchmark result and compare report."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpu_model() -> str:
    from kernels.native import cpuinfo

    return cpuinfo("model name") or platform.processor() or "unknown"


def memory_limit_bytes(cgroup_root: Path = Path("/sys/fs/cgroup"),
                       self_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The memory this process may use: the machine's physical memory, or less where a cgroup
    (a container's limit) caps it: cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`, on
    the process's own cgroup or any above it, whichever is smallest. v1's memory controller is
    looked for at <root>/memory (where systems mount it, or link to it when co-mounted)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return total
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2, the unified hierarchy
            base, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = cgroup_root / "memory", "memory.limit_in_bytes"
        else:
            continue
        d = base / path.strip("/")
        while True:
            try:
                text = (d / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():  # v2 says "max" where nothing is set
                total = min(total, int(text))
            if d == base:
                break
            d = d.parent
    return total


def device_memory(device) -> int:
    """What a device (cpu, cuda[:N]) offers: on CPU the machine's memory or a container's lower
    limit (memory_limit_bytes), on CUDA the GPU's."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from engine.errors import ConfigError

            raise ConfigError(f"there is no CUDA device here to read {device}'s memory from; "
                              "give the budget (nibble plan --memory 80GB)")
        return torch.cuda.get_device_properties(device).total_memory
    return memory_limit_bytes()


def machine_info() -> dict:
    import torch
    import transformers

    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            # the widest SIMD set torch's CPU kernels use here (AVX2, AVX512, ...): CPU numbers
            # from machines that differ in it are not comparable
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info
