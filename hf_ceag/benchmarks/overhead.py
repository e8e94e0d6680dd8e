"""Part 2 of BENCHMARKS.md: CEAG's overhead per optimizer step against NFT and a plain `transformers.Trainer`
(and, with --torch_compile_kinds, compiled plain and CEAG) on the same pruned model, data and steps."""

from __future__ import annotations

import os
import statistics
from typing import Any

from hf_ceag import CEAGConfig
from hf_ceag.benchmarks.formatting import verdict
from hf_ceag.benchmarks.profiling import device_profile, device_profile_markdown, profile, profile_markdown
from hf_ceag.benchmarks.settings import TARGETS
from hf_ceag.benchmarks.timing import fine_tune_args, paired_ratio, pruned_model, train_timed

OVERHEAD_KINDS = ("plain", "nft", "ceag")
PROFILED_STEPS = 10  # steps after the warm-up under torch.profiler (a ResNet-50 step is thousands of events)
COMPILED_KINDS = ("plain+compile", "ceag+compile")  # with --torch_compile_kinds (the device section)
SHORT_LABELS = {"plain": "plain Trainer", "nft": "NFT", "ceag": "CEAG"}
# ratio key -> (numerator, denominator) configurations
RATIOS = {
    "ceag_over_nft": ("ceag", "nft"),
    "nft_over_plain": ("nft", "plain"),
    "ceag_over_plain": ("ceag", "plain"),
    "compiled_ceag_over_plain": ("ceag+compile", "plain+compile"),
}
OVERHEAD_LABELS = {
    "plain": "`transformers.Trainer` (plain fine-tuning)",
    "nft": "`CEAGTrainer`, mitigation none (NFT)",
    "ceag": "`CEAGTrainer`, mitigation ceag (CEAG)",
    "plain+compile": "`transformers.Trainer`, `--torch_compile true`",
    "ceag+compile": "`CEAGTrainer`, CEAG, `--torch_compile true`",
}


def overhead(settings, context: dict, work: str) -> dict[str, Any]:
    """Seconds per step of plain Trainer, NFT and CEAG on the same pruned model, data and steps: one warm-up
    run each, then `repeats` rounds with the three interleaved (order rotated each round). Each run's median step
    time; each configuration's median over rounds; each ratio the median over rounds of the ratio within the
    round (`paired_ratio`), with every round's ratio in `paired`."""
    config, sparsity = context["config"], settings.sparsities[0]
    model = pruned_model(context["dense_dir"], config, sparsity)
    train = context["data"]["train"]

    def args_for(kind: str, steps: int) -> CEAGConfig:
        mitigation = "ceag" if kind.startswith("ceag") else "none"
        compiled = {"torch_compile": True} if kind.endswith("+compile") else {}
        return fine_tune_args(
            config, os.path.join(work, "overhead", kind), steps, sparsity, mitigation,
            dataloader_drop_last=True, **compiled,
        )  # fmt: skip

    kinds = OVERHEAD_KINDS + (COMPILED_KINDS if settings.torch_compile_kinds else ())
    for kind in OVERHEAD_KINDS:
        train_timed(kind, model, args_for(kind, settings.warmup_steps + 2), train, settings.warmup_steps)
    times = {kind: [] for kind in kinds}
    for repeat in range(settings.repeats):
        shift = repeat % len(kinds)
        order = kinds[shift:] + kinds[:shift]
        for kind in order:
            seconds, _ = train_timed(
                kind, model, args_for(kind, settings.overhead_steps), train, settings.warmup_steps
            )
            times[kind].append(seconds)
    median = {kind: statistics.median(values) for kind, values in times.items()}
    paired = {key: paired_ratio(times[num], times[den]) for key, (num, den) in RATIOS.items() if num in times}
    result = {
        "times": times,
        "median": median,
        **{key: ratio for key, (ratio, _) in paired.items()},
        "paired": {key: ratios for key, (_, ratios) in paired.items()},
        "rows": len(train),
        "batch": config.per_device_train_batch_size,
        "buffer_size": config.buffer_size,
        "sparsity": sparsity,
        "profiles": {},
    }
    profiled = {}  # a target missed: profile both sides of its ratio, and show the numerator's top functions
    for key in ("ceag_over_nft", "nft_over_plain"):
        numerator, denominator = RATIOS[key]
        if result[key] <= TARGETS[key] or settings.device_section:  # cProfile says little about device time
            continue
        for kind in (denominator, numerator):
            if kind not in profiled:
                args = args_for(kind, settings.overhead_steps)
                profiled[kind] = profile(kind, model, args, train, settings.warmup_steps)
        pair = {kind: profiled[kind] for kind in (denominator, numerator)}
        result["profiles"][key] = profile_markdown(pair, SHORT_LABELS, numerator)
    if getattr(settings, "device_profile", False):  # --device_profile: device time per op, eager kinds
        steps = min(settings.overhead_steps, settings.warmup_steps + PROFILED_STEPS)
        try:
            traced = {
                kind: device_profile(kind, model, args_for(kind, steps), train, settings.warmup_steps)
                for kind in OVERHEAD_KINDS
            }
            result["profiles"]["device"] = device_profile_markdown(traced, SHORT_LABELS)
        # a diagnosis only, first run on a GPU where time is scarce: whatever breaks it (kineto, the profiler's
        # post-processing), the timings above are kept and the section says why the profile is missing
        except Exception as error:  # noqa: BLE001
            result["profiles"]["device"] = f"`torch.profiler` failed: {type(error).__name__}: {error}"
    return result


def overhead_section(settings, over: dict, targets: dict[str, float] | None = None) -> str:
    """Part 2's markdown from `overhead`'s result: the set-up, ms/step per configuration, each ratio against
    its target (`TARGETS` unless given), and the profile of any missed target."""
    intro = (
        f"The same pruned model (the first dense model above, magnitude-pruned layer-wise to "
        f"{over['sparsity']:.0%}), the same {over['rows']} training rows, batch {over['batch']}, "
        f"{settings.overhead_steps} optimizer steps per run, every batch full (`dataloader_drop_last`), the same "
        "`CEAGConfig` for all three (the plain Trainer too gets its defaults: no NaN filter on the logged loss, "
        "non-blocking batch copies where memory is pinned for an accelerator). NFT and CEAG reach the target "
        "sparsity at step 0; "
        f"CEAG's constraints are on from step 0 (buffer {over['buffer_size']}, one dual step per step). Timed "
        f"with a `TrainerCallback` from the end of step {settings.warmup_steps} to the end of the last step: the "
        "training loop only — not the dense-reference pass `CEAGTrainer` makes before training, nor trainer "
        f"set-up. One untimed warm-up run per configuration, then {settings.repeats} round(s) with the "
        "configurations interleaved (order rotated). A run's ms/step is the median of its steps; a configuration's, "
        "the median of its runs; a ratio, the median over rounds of the ratio within each round (the two runs "
        "it compares shared that round's machine speed), with the range of those per-round ratios."
    )
    if any(kind.endswith("+compile") for kind in over["median"]):
        intro += (
            " With `--torch_compile true` the untimed steps at the start of each run hold the compilation, so "
            "those configurations have no warm-up run (the Trainer compiles the model again in every run)."
        )
    lines = [
        "## 2. Overhead per step",
        "",
        intro,
        "",
        "| configuration | ms/step (median) | steps/s | every run (median ms/step) |",
        "|---|---:|---:|---|",
    ]
    for kind in over["median"]:
        median = over["median"][kind]
        runs = ", ".join(f"{1000 * t:.1f}" for t in over["times"][kind])
        lines.append(f"| {OVERHEAD_LABELS[kind]} | {1000 * median:.1f} | {1 / median:.1f} | {runs} |")
    lines.append("")
    targets = targets or {key: TARGETS[key] for key in ("ceag_over_nft", "nft_over_plain")}
    labels = {"ceag_over_nft": "CEAG / NFT", "nft_over_plain": "NFT / plain", "ceag_over_plain": "CEAG / plain"}
    for key, target in targets.items():
        spread = over["paired"][key]
        lines.append(
            f"- {labels[key]} step time: **{over[key]:.3f}** ({verdict(over[key], target)}; per round "
            f"{min(spread):.3f}–{max(spread):.3f})"
        )
    for key, explanation in over["profiles"].items():
        title = "Device profile" if key == "device" else f"Profile: {key} missed its target"
        lines += ["", f"### {title}", "", explanation]
    return "\n".join(lines)
