#!/usr/bin/env python
"""Regenerate BENCHMARKS.md: the paper's method comparison in miniature, CEAG's per-step overhead, its cost as
groups grow from 10 to 10,000, and its peak memory — with the machine, library versions and exact command.

    python scripts/benchmark.py                  # CPU defaults: writes BENCHMARKS.md at the repository root
    python scripts/benchmark.py --quick          # every part in miniature (<= 2 min), written to a temp folder
    python scripts/benchmark.py --model resnet18 --image_size 64 --epochs 30 --dense_epochs 60   # GPU-size

Flags this script does not know go to `scripts/run_ceag.py`'s parser for every run (any `CEAGConfig` /
`TrainingArguments` flag, e.g. `--bf16 true --per_device_train_batch_size 128`). The last printed line holds
the headline ratios as `key=value` pairs: `ceag_over_nft`, `nft_over_plain`, `groups_<G>_over_<G0>` and
`ceag_rss_over_nft`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_ceag

from hf_ceag.benchmarks.default_run import default_runs
from hf_ceag.benchmarks.device import device_runs, device_section, device_values
from hf_ceag.benchmarks.document import (
    device_block,
    document,
    headline,
    merge_device_section,
    readme_results,
    update_readme,
)
from hf_ceag.benchmarks.generalisation import (
    generalisation_runs,
    generalisation_section,
    merge_section,
    section_block,
)
from hf_ceag.benchmarks.machine import commit, machine
from hf_ceag.benchmarks.memory import memory, memory_child
from hf_ceag.benchmarks.methods import method_runs
from hf_ceag.benchmarks.overhead import overhead
from hf_ceag.benchmarks.recipe import Recipe
from hf_ceag.benchmarks.scaling import fairgrape_cost, group_scaling, tiled_digits
from hf_ceag.benchmarks.settings import parse_settings as _parse_settings
from hf_ceag.benchmarks.settings import run_config
from hf_ceag.benchmarks.streaming_memory import (
    merge_streaming_section,
    streaming_block,
    streaming_child,
    streaming_runs,
    streaming_section,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = Recipe.from_module(run_ceag)


def parse_settings(argv: list[str]):
    """This script's flags (unset ones take the --quick or full defaults) and the flags left for run_ceag."""
    return _parse_settings(argv, RECIPE, __doc__)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run every part, write the markdown, print it, and end with the headline `key=value` line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, extra = parse_settings(argv)
    if settings.memory_child:
        memory_child(RECIPE, settings, extra)
        return {}
    if settings.streaming_child:
        kind, _, rows = settings.streaming_child.partition(":")
        streaming_child(
            kind, int(rows), settings.streaming_eval_rows, settings.streaming_steps, settings.image_size,
            settings.work_dir,
        )  # fmt: skip
        return {}
    if settings.merge_device_section:
        with open(settings.merge_device_section) as f:
            merge_device_section(settings.output or os.path.join(REPO_ROOT, "BENCHMARKS.md"), f.read())
        return {}
    run_config(RECIPE, settings, extra, "unused", 0, settings.variants[0])  # unknown flags fail now, not later
    output = settings.output or (
        os.path.join(tempfile.mkdtemp(prefix="hf-ceag-quick-"), "BENCHMARKS.md")
        if settings.quick
        else os.path.join(REPO_ROOT, "BENCHMARKS.md")
    )
    work = settings.work_dir or tempfile.mkdtemp(prefix="hf-ceag-bench-")
    if settings.device_section:
        return device_main(settings, extra, argv, output, work)
    if settings.generalisation_section:
        return generalisation_main(settings, extra, argv, output, work)
    if settings.streaming_section:
        return streaming_main(settings, argv, output, work)
    seconds, start = {}, time.perf_counter()
    try:
        defaults = default_runs(RECIPE, settings, extra, work, REPO_ROOT)
        seconds["default"] = time.perf_counter() - start
        runs, context = method_runs(RECIPE, settings, extra, work)
        seconds["methods"] = time.perf_counter() - start - sum(seconds.values())
        over = overhead(settings, context, work)
        seconds["overhead"] = time.perf_counter() - start - sum(seconds.values())
        tiled = tiled_digits(context["data"]["train"], 2 * max(settings.groups + settings.fairgrape_groups))
        scaling = group_scaling(settings, context, work, tiled)
        fairgrape = fairgrape_cost(settings, context, tiled)
        seconds["groups"] = time.perf_counter() - start - sum(seconds.values())
        peaks = memory(os.path.abspath(__file__), argv, context, work)
        seconds["memory"] = time.perf_counter() - start - sum(seconds.values())
    finally:
        if not settings.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    seconds["total"] = time.perf_counter() - start
    values = headline(over, scaling, peaks)
    line = " ".join(f"{key}={value:.3f}" for key, value in values.items())
    results = (defaults, runs, over, scaling, fairgrape, peaks)
    head = commit(REPO_ROOT)
    text = document(settings, argv, *results, seconds, line, recipe_defaults=RECIPE.defaults, commit=head)
    if os.path.isfile(output):
        with open(output) as f:
            text += "".join(f"\n{kept}\n" for kept in kept_blocks(f.read()))
    _write(output, text)
    if os.path.abspath(output) == os.path.join(REPO_ROOT, "BENCHMARKS.md"):
        update_readme(os.path.join(REPO_ROOT, "README.md"), readme_results(argv, defaults, head))
    _report(text, output, line)
    return values


def kept_blocks(text: str) -> list[str]:
    """The blocks of a BENCHMARKS.md `text` that their own commands measured (part 5, part 6, the device
    sections), in that order: a full run rewrites the rest of the file and keeps these."""
    return [kept for kept in (section_block(text), streaming_block(text), device_block(text)) if kept]


def device_main(settings, extra: list[str], argv: list[str], output: str, work: str) -> dict[str, float]:
    """`--device_section`: one dense model, then the overhead part (with the compiled kinds if asked) and
    FairGRAPE's cost, written as the accelerator's section of BENCHMARKS.md."""
    start = time.perf_counter()
    try:
        measured = device_runs(RECIPE, settings, extra, work)
    finally:
        if not settings.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    values = device_values(measured["over"])
    line = " ".join(f"{key}={value:.3f}" for key, value in values.items())
    head = os.environ.get("HF_CEAG_COMMIT") or commit(REPO_ROOT)
    text = device_section(settings, argv, measured, time.perf_counter() - start, head, line)
    _write(output, text)
    _report(text, output, line)
    return values


def generalisation_main(settings, extra: list[str], argv: list[str], output: str, work: str) -> dict:
    """`--generalisation_section`: part 5's runs, written into the part-5 block of `output`."""
    start = time.perf_counter()
    try:
        rows = generalisation_runs(RECIPE, settings, extra, work, REPO_ROOT)
    finally:
        if not settings.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    facts = machine()
    cores = os.cpu_count() or 1
    at_once = ", ".join(
        f"{t} thread{'s' if t > 1 else ''} a run, {max(1, cores // t)} at once" for t in settings.default_threads
    )
    where = f"CPU {facts['CPU']}; cores {facts['cores']}; RAM {facts['RAM']}; {at_once}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = generalisation_section(
        settings, argv, rows, time.perf_counter() - start, commit(REPO_ROOT), when, where
    )
    merge_section(output, text)
    print(text)
    print(f"Wrote part 5 into {output}")
    return {}


def streaming_main(settings, argv: list[str], output: str, work: str) -> dict:
    """`--streaming_section`: part 6's runs, each in a fresh process of this script, written into the part-6
    block of `output`."""
    start = time.perf_counter()
    try:
        measured = streaming_runs(os.path.abspath(__file__), settings, work)
    finally:
        if not settings.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    facts = machine()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    where = f"CPU {facts['CPU']}; cores {facts['cores']}; RAM {facts['RAM']}; OMP_NUM_THREADS {threads}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = streaming_section(settings, argv, measured, time.perf_counter() - start, commit(REPO_ROOT), when, where)
    merge_streaming_section(output, text)
    print(text)
    print(f"Wrote part 6 into {output}")
    return {"measured": measured, "text": text}


def _write(output: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(text)


def _report(text: str, output: str, line: str) -> None:
    print(text)
    print(f"Wrote {output}")
    print(line)


if __name__ == "__main__":
    main()
