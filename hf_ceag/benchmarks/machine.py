"""What a benchmark figure was measured on: the machine, the library versions and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

import torch


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, GPU, torch threads and OS of this machine."""
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        ram = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        ram = "unknown"
    gpu = "none"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} (× {torch.cuda.device_count()})"
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": ram,
        "GPU": gpu,
        "torch threads": str(torch.get_num_threads()),
        "OS": platform.platform(),
    }


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the benchmark exercises."""
    found = {"python": platform.python_version()}
    for package in ("hf-ceag", "torch", "transformers", "timm", "datasets", "accelerate", "cooper-optim", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def commit(repo_root: str) -> str:
    """The short hash of the commit checked out in `repo_root`, or "unknown" without git."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=repo_root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"
