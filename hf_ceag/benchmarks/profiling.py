"""Where a training step's time goes: cProfile over the steps after the warm-up of one timed run, summed into
the parts of a step, and the top functions, as markdown."""

from __future__ import annotations

import cProfile
import os
import pstats

import datasets

from hf_ceag import CEAGConfig
from hf_ceag.benchmarks.timing import train_timed

# Parts of a training step in a profile: (label, a piece of the defining file's path or None, function name)
STEP_PARTS = (
    ("data loading (`get_batch_samples`)", "transformers/trainer.py", "get_batch_samples"),
    ("forward and loss (`compute_loss`)", None, "compute_loss"),
    ("… of which constraints and estimates (`ConstrainedStep.loss`)", "hf_ceag/constraints/step.py", "loss"),
    ("backward", "accelerate/accelerator.py", "backward"),
    ("optimizer step, with the mask hooks", "accelerate/optimizer.py", "step"),
)


def profile(kind: str, model, args: CEAGConfig, train: datasets.Dataset, warmup: int) -> tuple[dict, int]:
    """cProfile statistics of the steps after the warm-up of one run, and the number of steps profiled."""
    profiler = cProfile.Profile()
    train_timed(kind, model, args, train, warmup, profiler)
    return pstats.Stats(profiler).stats, args.max_steps - warmup


def _cumulative(stats: dict, path_part: str | None, function: str) -> float:
    values = [
        v[3]
        for (path, _, name), v in stats.items()
        if name == function and (path_part is None or path_part in path)
    ]
    return max(values, default=0.0)


def _is_method_code(path: str) -> bool:
    # the benchmark's own step timer lives in hf_ceag too, but is not part of the method's cost
    return ("hf_ceag" in path or "cooper" in path) and os.path.join("hf_ceag", "benchmarks") not in path


def _function_table(entries, title: str, steps: int) -> str:
    lines = [title, "", "| function | calls | own ms/step | cumulative ms/step |", "|---|---:|---:|---:|"]
    for (path, line, function), (_, calls, own, cumulative, _) in entries:
        where = f"{os.path.basename(path)}:{line}({function})" if line else function
        lines.append(f"| `{where}` | {calls} | {1000 * own / steps:.2f} | {1000 * cumulative / steps:.2f} |")
    return "\n".join(lines)


def profile_markdown(profiles: dict[str, tuple[dict, int]], labels: dict[str, str], focus: str) -> str:
    """Where a step's time goes in each profiled run, side by side (ms per step under cProfile), then the
    top functions of `focus` by own time and its hf_ceag / cooper functions by cumulative time."""
    names = list(profiles)
    lines = [
        "| part of a step (ms, under cProfile) | " + " | ".join(labels[n] for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for part, path_part, function in STEP_PARTS:
        cells = [
            f"{1000 * _cumulative(stats, path_part, function) / steps:.2f}" for stats, steps in profiles.values()
        ]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    totals = [f"{1000 * sum(v[2] for v in stats.values()) / steps:.2f}" for stats, steps in profiles.values()]
    lines.append("| all profiled time | " + " | ".join(totals) + " |")
    stats, steps = profiles[focus]
    by_own = sorted(stats.items(), key=lambda item: -item[1][2])[:15]
    ours = [item for item in stats.items() if _is_method_code(item[0][0])]
    ours = sorted(ours, key=lambda item: -item[1][3])[:12]
    return "\n\n".join(
        [
            (
                f"cProfile over the {steps} steps after the warm-up of one run each (it slows Python-heavy code "
                "more than kernels, so read the parts relative to each other):"
            ),
            "\n".join(lines),
            _function_table(by_own, f"{labels[focus]}: top functions by own time", steps),
            _function_table(ours, f"{labels[focus]}: hf_ceag and cooper functions by cumulative time", steps),
        ]
    )
