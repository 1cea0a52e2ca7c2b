"""What machine a benchmark ran on, and how busy it was: shared by the speed scripts."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def describe() -> dict[str, str | int | float]:
    """CPU model, cores, RAM and the versions that set the speed (torch, open_clip, faiss)."""
    import faiss
    import numpy as np
    import open_clip
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "ram_gib": round(ram, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "faiss": faiss.__version__,
    }


def busy_seconds() -> tuple[float, float]:
    """Machine-wide (non-idle CPU seconds, hypervisor steal seconds) since boot; nan if unknown."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return float("nan"), float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def background_cores(seconds: float = 3.0) -> float:
    """Cores kept busy by other processes while this one sleeps (0 on a quiet machine)."""
    busy0 = sum(busy_seconds())
    time.sleep(seconds)
    return (sum(busy_seconds()) - busy0) / seconds
