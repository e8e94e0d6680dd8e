"""The device section of BENCHMARKS.md (`--device_section`): one dense model, then the overhead part (with the
compiled kinds if asked) and FairGRAPE's cost, measured on this machine's accelerator and written as a section
that `document.merge_device_section` adds to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import shlex
import time
from typing import Any

import torch

from hf_ceag.benchmarks.machine import machine, versions
from hf_ceag.benchmarks.methods import dense_context
from hf_ceag.benchmarks.overhead import overhead, overhead_section
from hf_ceag.benchmarks.recipe import Recipe
from hf_ceag.benchmarks.scaling import fairgrape_cost, fairgrape_markdown, tiled_digits
from hf_ceag.benchmarks.settings import DEVICE_TARGETS


def device_runs(recipe: Recipe, settings, extra: list[str], work: str) -> dict[str, Any]:
    """The device section's measurements: `over` (`overhead`'s result), `fairgrape` (`fairgrape_cost`'s, empty
    without --fairgrape_groups) and `dense_seconds`, the time to load the data and train the dense model."""
    start = time.perf_counter()
    context = dense_context(recipe, settings, extra, work, settings.variants[0], settings.seeds[0])
    dense_seconds = time.perf_counter() - start
    over = overhead(settings, context, work)
    fairgrape = {}
    if settings.fairgrape_groups:
        tiled = tiled_digits(context["data"]["train"], 2 * max(settings.fairgrape_groups))
        fairgrape = fairgrape_cost(settings, context, tiled)
    return {"over": over, "fairgrape": fairgrape, "dense_seconds": dense_seconds}


def device_values(over: dict) -> dict[str, float]:
    """The device section's headline ratios, by key (compiled CEAG / compiled plain where both were timed)."""
    values = {
        "nft_over_plain": over["nft_over_plain"],
        "ceag_over_plain": over["ceag_over_plain"],
        "ceag_over_nft": over["ceag_over_nft"],
    }
    if "compiled_ceag_over_plain" in over:
        values["compiled_ceag_over_plain"] = over["compiled_ceag_over_plain"]
    return values


def device_section(
    settings, argv: list[str], measured: dict[str, Any], run_seconds: float, commit: str, line: str
) -> str:
    """The section's markdown from `device_runs`' result: the set-up (GPU, command, commit, machine, versions,
    model), part 2 against the GPU targets, the ratios, FairGRAPE's cost, and the headline `line`."""
    over, fairgrape = measured["over"], measured["fairgrape"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    size = f"{settings.image_size}×{settings.image_size}"
    setup = [
        f"## Measured on {gpu}",
        "",
        f"- Command: `{shlex.join(['python', 'scripts/benchmark.py', *argv])}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}",
        "- Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        (
            f"- Model: `{settings.model}` at {size}, dense training {settings.dense_epochs:g} epochs on the "
            f"`{settings.variants[0]}` digits ({measured['dense_seconds']:.0f} s); run time {run_seconds:.0f} s"
        ),
        (
            "- Targets on a GPU (ResNet-50, 224 px, bf16, batch 128): "
            f"NFT/plain ≤ {DEVICE_TARGETS['nft_over_plain']}, CEAG/plain ≤ {DEVICE_TARGETS['ceag_over_plain']}"
        ),
    ]
    ratios = [f"- CEAG / NFT step time: **{over['ceag_over_nft']:.3f}**"]
    if "compiled_ceag_over_plain" in over:
        compiled = over["compiled_ceag_over_plain"]
        ratios.append(f"- compiled CEAG / compiled plain step time: **{compiled:.3f}**")
    parts = ["\n".join(setup), overhead_section(settings, over, DEVICE_TARGETS), "\n".join(ratios)]
    text = "\n\n".join(parts + ([fairgrape_markdown(settings, fairgrape)] if fairgrape else []))
    return text + f"\n\n```\n{line}\n```\n"
