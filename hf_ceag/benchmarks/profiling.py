"""Where a training step's time goes, as markdown: cProfile over the steps after the warm-up of one timed run,
summed into the parts of a step, with the top functions; and on an accelerator (`--device_profile`),
`torch.profiler`'s device time per op, configurations side by side."""

from __future__ import annotations

import cProfile
import os
import pstats

import datasets
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

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


class TorchProfiler:
    """`torch.profiler` with cProfile's `enable()` / `disable()`, for `StepTimer`: records the steps after the
    warm-up, on the device too when there is one."""

    def __init__(self) -> None:
        self.on_device = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_device else [])
        self.profiler = torch.profiler.profile(activities=activities)
        self.running = False

    def enable(self) -> None:
        self.profiler.start()
        self.running = True

    def disable(self) -> None:
        if self.running:
            self.profiler.stop()
            self.running = False

    def op_times(self) -> dict[str, tuple[int, float]]:
        """Per op (`aten::…`, a Python-level record): (calls, µs). On a device, the time of the kernels the op
        itself launched (each kernel counted once, under its op); without one, the op's own CPU time."""
        times = {}
        for event in self.profiler.key_averages():
            if event.device_type != DeviceType.CPU:
                continue  # the kernels' own rows: already counted under the ops that launched them
            spent = event.self_device_time_total if self.on_device else event.self_cpu_time_total
            times[event.key] = (event.count, spent)
        return times


def device_profile(
    kind: str, model, args: CEAGConfig, train: datasets.Dataset, warmup: int
) -> tuple[dict[str, tuple[int, float]], int, float]:
    """One run under `torch.profiler` from the end of step `warmup` on: (op -> (calls, µs)), the number of
    steps profiled, and their wall-clock seconds per step (median, the profiler's cost included)."""
    profiler = TorchProfiler()
    seconds, _ = train_timed(kind, model, args, train, warmup, profiler)
    return profiler.op_times(), args.max_steps - warmup, seconds


def device_profile_markdown(
    profiles: dict[str, tuple[dict, int, float]], labels: dict[str, str], top: int = 15
) -> str:
    """Each configuration's device time per step (the sum over ops) against its wall time, then the ops whose
    time per step differs most from the first configuration's, side by side (µs and calls per step)."""
    names = list(profiles)
    base = names[0]
    per_step = {
        name: {op: (calls / steps, spent / steps) for op, (calls, spent) in times.items()}
        for name, (times, steps, _) in profiles.items()
    }
    on_device = torch.cuda.is_available()
    what = "device (kernel) time" if on_device else "CPU time of each op itself (no accelerator)"
    header = "| op | " + " | ".join(f"{labels[n]} µs/step (calls)" for n in names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    busy = [sum(spent for _, spent in per_step[n].values()) for n in names]
    wall = [1e6 * profiles[n][2] for n in names]
    lines.append("| **all ops** | " + " | ".join(f"{b:.0f}" for b in busy) + " |")
    lines.append("| **wall clock** | " + " | ".join(f"{w:.0f}" for w in wall) + " |")
    ops = set().union(*(per_step[n] for n in names))

    def gap(op: str) -> float:
        own = per_step[base].get(op, (0, 0.0))[1]
        return max(abs(per_step[n].get(op, (0, 0.0))[1] - own) for n in names)

    for op in sorted(ops, key=gap, reverse=True)[:top]:
        cells = []
        for n in names:
            calls, spent = per_step[n].get(op, (0.0, 0.0))
            cells.append(f"{spent:.1f} ({calls:g})")
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    steps = profiles[base][1]
    return "\n\n".join(
        [
            (
                f"`torch.profiler` over the {steps} steps after the warm-up of one more run each: {what} per "
                f"step, summed over every op, against the wall clock (the profiler's own cost included); then "
                f"the {top} ops whose time per step differs most from the {labels[base]}'s."
            ),
            "\n".join(lines),
        ]
    )
