"""Part 4 of BENCHMARKS.md: resident memory (and GPU memory) of an NFT and a CEAG run, each in a fresh process
of the benchmark script, before the run and at its peak."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import torch

from hf_ceag import image_processor
from hf_ceag.benchmarks.recipe import Recipe
from hf_ceag.benchmarks.settings import method_config, run_config


def _status_mib(field: str) -> float | None:
    # /proc/self/status is per address space: unlike ru_maxrss, which Linux carries over from the parent
    # through fork and exec, VmHWM starts afresh in a new program.
    try:
        with open("/proc/self/status") as f:
            values = [line.split()[1] for line in f if line.startswith(field + ":")]
    except OSError:
        return None
    return int(values[0]) / 1024 if values else None


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB; where /proc is missing, ru_maxrss for both."""
    current, peak = _status_mib("VmRSS"), _status_mib("VmHWM")
    if current is None or peak is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux
        current = peak
    return current, peak


def reset_peak_rss() -> bool:
    """Set this process's peak resident memory (VmHWM) back to its current one, so that a later peak is that of
    what ran since; False where Linux's /proc/self/clear_refs is missing (the peak then includes what came before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure_in_child(command: list[str], name: str) -> dict[str, float]:
    """Run `command` (a fresh process of the benchmark script) and read its last line of `key=value` figures,
    which starts with `rss_before_mib=`; a failed run raises a `RuntimeError` naming `name` with its stderr."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("rss_before_mib="):
        raise RuntimeError(f"memory run {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {k: float(v) for k, v in (pair.split("=") for pair in lines[-1].split())}


def memory(script: str, argv: list[str], context: dict, work: str) -> dict[str, dict[str, float]]:
    """Resident memory of an NFT and a CEAG run, each in a fresh subprocess of the benchmark `script` run with
    `argv` and `--memory_child` (`memory_child`: first variant, seed and sparsity of the table, same recipe,
    reusing its dense model): before the run and at its peak."""
    measured = {}
    for method in ("nft", "ceag"):
        command = [
            sys.executable, script, *argv, "--memory_child", method,
            "--memory_dense", context["dense_dir"], "--memory_out", os.path.join(work, "memory", method),
        ]  # fmt: skip
        measured[method] = measure_in_child(command, method)
    return measured


def memory_child(recipe: Recipe, settings, extra: list[str]) -> None:
    """One pruning run of the table (first variant, seed, sparsity); its last line gives the resident memory
    before the run (libraries and data loaded) and the peak."""
    variant, seed, sparsity = settings.variants[0], settings.seeds[0], settings.sparsities[0]
    script, config = run_config(recipe, settings, extra, settings.memory_out, seed, variant)
    data, channels = recipe.load_data(script, config)
    processor = image_processor(script.image_size, channels, digits=True)
    cfg = method_config(config, settings.memory_child, sparsity, settings.memory_out)
    before, _ = rss_mib()
    recipe.prune_with(cfg.mitigation, settings.memory_dense, cfg, data, processor)
    gpu = f" gpu_peak_mib={torch.cuda.max_memory_allocated() / 2**20:.1f}" if torch.cuda.is_available() else ""
    print(f"rss_before_mib={before:.1f} peak_rss_mib={rss_mib()[1]:.1f}{gpu}")


def memory_section(measured: dict[str, dict[str, float]]) -> str:
    """Part 4's markdown from `memory`'s result."""
    nft, ceag = measured["nft"], measured["ceag"]
    growth = {m: v["peak_rss_mib"] - v["rss_before_mib"] for m, v in measured.items()}
    gpu = all("gpu_peak_mib" in v for v in measured.values())
    lines = [
        "## 4. Peak memory",
        "",
        (
            "One pruning run of the table's first setting per method, each in a fresh subprocess of this "
            "script, reusing the same dense model. Resident memory from `/proc/self/status` (VmRSS before the "
            "run, once the libraries and data are loaded; VmHWM, the peak, after it). The libraries dominate at "
            "this model size." + (" GPU: `torch.cuda.max_memory_allocated()`." if gpu else "")
        ),
        "",
        "| method | before the run (MiB) | peak (MiB) | peak − before (MiB) |"
        + (" GPU peak (MiB) |" if gpu else ""),
        "|---|---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    for method, label in (("nft", "NFT"), ("ceag", "CEAG")):
        v = measured[method]
        lines.append(
            f"| {label} | {v['rss_before_mib']:.1f} | {v['peak_rss_mib']:.1f} | {growth[method]:.1f} |"
            + (f" {v['gpu_peak_mib']:.1f} |" if gpu else "")
        )
    lines += ["", f"- CEAG / NFT peak RSS: **{ceag['peak_rss_mib'] / nft['peak_rss_mib']:.3f}**"]
    return "\n".join(lines)
