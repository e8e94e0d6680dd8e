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

import argparse
import copy
import cProfile
import dataclasses
import datetime
import json
import math
import os
import platform
import pstats
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any

import datasets
import torch
from transformers import AutoModelForImageClassification, HfArgumentParser, Trainer, TrainerCallback, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_ceag

from hf_ceag import CEAGConfig, CEAGTrainer, MagnitudePruner, image_processor, prunable_parameters
from hf_ceag.pruning.fairgrape import fairgrape_masks, greedy_select, group_importance, target_shares

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method key -> (label, mitigation, buffer size (None: the recipe's), pruning method)
METHODS = {
    "nft": ("NFT", "none", None, "magnitude"),
    "el": ("EL", "equalized_loss", 0, "magnitude"),
    "el+rb": ("EL+RB", "equalized_loss", None, "magnitude"),
    "ceag": ("CEAG", "ceag", None, "magnitude"),
    "ceag-paper": ("CEAG, paper's proxy", "ceag", None, "magnitude"),  # surrogate_overall_gradient=True
    "fairgrape": ("FairGRAPE", "none", None, "fairgrape"),
}
VARIANTS = ("styled", "balanced", "imbalanced")
OVERHEAD_KINDS = ("plain", "nft", "ceag")
COMPILED_KINDS = ("plain+compile", "ceag+compile")  # with --torch_compile_kinds (the device section)
SHORT_LABELS = {"plain": "plain Trainer", "nft": "NFT", "ceag": "CEAG"}
OVERHEAD_LABELS = {
    "plain": "`transformers.Trainer` (plain fine-tuning)",
    "nft": "`CEAGTrainer`, mitigation none (NFT)",
    "ceag": "`CEAGTrainer`, mitigation ceag (CEAG)",
    "plain+compile": "`transformers.Trainer`, `--torch_compile true`",
    "ceag+compile": "`CEAGTrainer`, CEAG, `--torch_compile true`",
}
TARGETS = {"ceag_over_nft": 1.05, "nft_over_plain": 1.03, "groups_10000_over_10": 1.10}
DEVICE_TARGETS = {"nft_over_plain": 1.01, "ceag_over_plain": 1.03}  # on a GPU (ResNet-50, 224 px, bf16, 128)
# Parts of a training step in a profile: (label, a piece of the defining file's path or None, function name)
STEP_PARTS = (
    ("data loading (`get_batch_samples`)", "transformers/trainer.py", "get_batch_samples"),
    ("forward and loss (`compute_loss`)", None, "compute_loss"),
    ("… of which constraints and estimates (`_constrained_loss`)", "hf_ceag", "_constrained_loss"),
    ("backward", "accelerate/accelerator.py", "backward"),
    ("optimizer step, with the mask hooks", "accelerate/optimizer.py", "step"),
)

_SCRIPT = run_ceag.ScriptArguments.__dataclass_fields__
FULL = {
    "seeds": [0, 1, 2],
    "variants": ["styled", "imbalanced"],
    "sparsities": [0.95, 0.975, 0.99],
    "methods": list(METHODS),
    "epochs": run_ceag.RECIPE_DEFAULTS["num_train_epochs"],
    "pruning_end_epoch": run_ceag.RECIPE_DEFAULTS["pruning_end_epoch"],
    "dense_epochs": _SCRIPT["dense_epochs"].default,
    "overhead_steps": 60,
    "warmup_steps": 10,
    "repeats": 5,
    "groups": [10, 100, 1000, 10000],
    "scaling_steps": 60,
    "scaling_repeats": 3,
    "fairgrape_groups": [10, 100],
    "calibration_batches": 8,
    "default_seeds": [0, 1, 2, 3, 4],
    "default_threads": [1, 2],
    "default_flags": [],
}
QUICK = {
    **FULL,
    "seeds": [0],
    "variants": ["imbalanced"],
    "sparsities": [0.9],
    "methods": ["nft", "ceag"],
    "epochs": 4,
    "pruning_end_epoch": 2,
    "dense_epochs": 5,
    "overhead_steps": 30,
    "warmup_steps": 5,
    "repeats": 3,
    "groups": [10, 10000],
    "scaling_steps": 30,
    "scaling_repeats": 1,
    "calibration_batches": 2,
    "default_seeds": [0],
    "default_threads": [1],
    # the README's command in miniature: the small digits, a few epochs
    "default_flags": [
        "--digits_variant",
        "imbalanced",
        "--num_train_epochs",
        "3",
        "--pruning_end_epoch",
        "1",
        "--dense_epochs",
        "4",
        "--target_sparsity",
        "0.9",
        "--buffer_size",
        "8",
    ],
}


# ---- settings ----


def parse_settings(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags (unset ones take the --quick or full defaults) and the flags left for run_ceag."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--quick", action="store_true", help="Every part in miniature (<= 2 minutes on 2 CPUs).")
    parser.add_argument("--output", help="Markdown file to write (default: BENCHMARKS.md; --quick: a temp dir).")
    parser.add_argument("--work_dir", help="Folder for models and runs, kept (default: a temp dir, removed).")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--sparsities", type=float, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--model", default="test_resnet", help="timm architecture or transformers model type.")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--epochs", type=float, help="Epochs of each pruning run (recipe: 8).")
    parser.add_argument(
        "--pruning_end_epoch", type=float, help="Epoch the target sparsity is reached (recipe: 3)."
    )
    parser.add_argument("--dense_epochs", type=float, help="Epochs of dense training (recipe: 15).")
    parser.add_argument("--overhead_steps", type=int, help="Optimizer steps per overhead run.")
    parser.add_argument("--warmup_steps", type=int, help="Untimed steps at the start of every timed run.")
    parser.add_argument("--repeats", type=int, help="Timed runs per overhead configuration (median taken).")
    parser.add_argument("--groups", type=int, nargs="+", help="Group counts of the scaling part.")
    parser.add_argument("--scaling_steps", type=int, help="Optimizer steps per group-scaling run.")
    parser.add_argument("--scaling_repeats", type=int, help="Timed runs per group count (median taken).")
    parser.add_argument(
        "--fairgrape_groups", type=int, nargs="*", help="Group counts of FairGRAPE's cost (none: skip it)."
    )
    parser.add_argument("--calibration_batches", type=int, help="FairGRAPE calibration batches per round.")
    parser.add_argument(
        "--default_seeds", type=int, nargs="+", help="Seeds of part 0 (the default run, as a user runs it)."
    )
    parser.add_argument(
        "--default_threads", type=int, nargs="+", help="OMP_NUM_THREADS values of part 0 (each with every seed)."
    )
    parser.add_argument(
        "--device_section",
        action="store_true",
        help="Only the overhead and FairGRAPE parts, as a section for BENCHMARKS.md measured on this machine's "
        "accelerator (e.g. --model resnet50 --image_size 224 --per_device_train_batch_size 128 --bf16 true).",
    )
    parser.add_argument(
        "--merge_device_section",
        metavar="FILE",
        help="Add FILE (written by --device_section, e.g. on a GPU machine) to BENCHMARKS.md's device sections, "
        "then stop.",
    )
    parser.add_argument(
        "--torch_compile_kinds", action="store_true", help="Also time plain and CEAG with --torch_compile true."
    )
    for hidden in ("--memory_child", "--memory_dense", "--memory_out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    settings, extra = parser.parse_known_args(argv)
    for key, value in (QUICK if settings.quick else FULL).items():
        if getattr(settings, key, None) is None:
            setattr(settings, key, value)
    _validate(settings)
    return settings, extra


def _validate(settings: argparse.Namespace) -> None:
    for name in ("overhead_steps", "scaling_steps"):
        if getattr(settings, name) <= settings.warmup_steps:
            raise ValueError(
                f"--{name} must exceed --warmup_steps={settings.warmup_steps} (timed steps follow it)."
            )
    if settings.warmup_steps < 1 or settings.repeats < 1 or settings.scaling_repeats < 1:
        raise ValueError("--warmup_steps, --repeats and --scaling_repeats must be >= 1.")
    if min(settings.groups + settings.fairgrape_groups) < 1:
        raise ValueError("--groups and --fairgrape_groups must be >= 1.")
    bad = [s for s in settings.sparsities if not 0.0 < s < 1.0]
    if bad:
        raise ValueError(f"--sparsities {bad} must lie in (0, 1), e.g. 0.9 for 90 %.")


def run_config(settings, extra: list[str], output_dir: str, seed: int, variant: str):
    """run_ceag's (ScriptArguments, CEAGConfig) for one (variant, seed): its recipe plus this script's flags."""
    parser = HfArgumentParser((run_ceag.ScriptArguments, CEAGConfig))
    parser.set_defaults(**run_ceag.RECIPE_DEFAULTS)
    args = [
        "--output_dir", output_dir, "--seed", str(seed), "--digits_variant", variant,
        "--model_name_or_path", settings.model, "--image_size", str(settings.image_size),
        "--num_train_epochs", str(settings.epochs), "--pruning_end_epoch", str(settings.pruning_end_epoch),
        "--dense_epochs", str(settings.dense_epochs), "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    return parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)


def method_config(config: CEAGConfig, method: str, sparsity: float, output_dir: str) -> CEAGConfig:
    """The config of one method of the table at one target sparsity."""
    _, mitigation, buffer_size, pruning_method = METHODS[method]
    return dataclasses.replace(
        config,
        output_dir=output_dir,
        target_sparsity=sparsity,
        mitigation=mitigation,
        buffer_size=config.buffer_size if buffer_size is None else buffer_size,
        pruning_method=pruning_method,
        surrogate_overall_gradient=method == "ceag-paper",
    )


# ---- 0. the default run, as a user runs it ----


def default_runs(settings, extra: list[str], work: str) -> list[dict]:
    """`python scripts/run_ceag.py --seed S` (the README's first command: dense training, NFT and CEAG) in a
    fresh process per (threads, seed), with OMP_NUM_THREADS set; as many at once as the cores allow."""
    jobs = [(threads, seed) for threads in settings.default_threads for seed in settings.default_seeds]
    script = os.path.join(REPO_ROOT, "scripts", "run_ceag.py")
    rows, running = [], []
    cores = os.cpu_count() or 1
    os.makedirs(work, exist_ok=True)
    for threads, seed in jobs:
        while running and (sum(t for t, *_ in running) + threads > cores or running[0][0] != threads):
            rows.append(_finish_default_run(*running.pop(0)))
        out = os.path.join(work, f"default-threads{threads}-seed{seed}")
        command = [sys.executable, script, "--seed", str(seed), "--output_dir", out, "--disable_tqdm", "true"]
        command += [*settings.default_flags, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        log = open(os.path.join(work, f"default-threads{threads}-seed{seed}.log"), "w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        running.append((threads, seed, out, process, log, time.perf_counter()))
    rows += [_finish_default_run(*job) for job in running]
    return sorted(rows, key=lambda r: (r["threads"], r["seed"]))


def _finish_default_run(threads, seed, out, process, log, start) -> dict:
    code = process.wait()
    log.close()
    if code != 0:
        raise RuntimeError(f"python scripts/run_ceag.py --seed {seed} (threads {threads}) failed; see {log.name}.")
    row = {"threads": threads, "seed": seed, "seconds": time.perf_counter() - start}
    for method in ("nft", "ceag"):
        with open(os.path.join(out, method, "report.json")) as f:
            report = json.load(f)
        train, test = report["splits"]["train"], report["splits"]["test"]
        row[method] = {
            "train_max": train["max_excess_gap"],
            "test_max": test["max_excess_gap"],
            "test_accuracy": test["accuracy_sparse"],
            "min_train_n": min(g["n"] for g in train["groups"]),
        }
        row["tolerance"] = report["tolerance"]
    return row


def default_claims(row: dict) -> dict[str, bool]:
    """The default's three claims for one run: NFT's train max ψ_g > 2ε, CEAG's ≤ ε, and CEAG's test accuracy
    within one point of NFT's."""
    eps = row["tolerance"]
    return {
        "nft_over_2eps": row["nft"]["train_max"] > 2 * eps,
        "ceag_within_eps": row["ceag"]["train_max"] <= eps,
        "accuracy_within_1pt": row["ceag"]["test_accuracy"] >= row["nft"]["test_accuracy"] - 0.01,
    }


def default_summary_table(rows: list[dict]) -> str:
    """Per thread count: how many seeds meet each claim, and the figures as mean ± std over seeds."""
    lines = [
        "| threads | seeds | NFT train max ψ_g | CEAG train max ψ_g | NFT test max ψ_g | CEAG test max ψ_g "
        "| NFT test accuracy | CEAG test accuracy | NFT > 2ε | CEAG ≤ ε | CEAG accuracy ≥ NFT − 0.01 | all three |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for threads in dict.fromkeys(r["threads"] for r in rows):
        group = [r for r in rows if r["threads"] == threads]
        claims = [default_claims(r) for r in group]
        counts = [
            sum(c[key] for c in claims) for key in ("nft_over_2eps", "ceag_within_eps", "accuracy_within_1pt")
        ]
        cells = [
            _cell([r[m][key] for r in group], 3, signed=key != "test_accuracy")
            for key in ("train_max", "test_max", "test_accuracy")
            for m in ("nft", "ceag")
        ]
        counts.append(sum(all(c.values()) for c in claims))
        lines.append(
            f"| {threads} | {len(group)} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(f"{n}/{len(group)}" for n in counts)
            + " |"
        )
    return "\n".join(lines)


def default_run_table(rows: list[dict]) -> str:
    """One line per run."""
    lines = [
        "| threads | seed | NFT train max ψ_g | CEAG train max ψ_g | NFT test max ψ_g | CEAG test max ψ_g "
        "| NFT test accuracy | CEAG test accuracy | wall time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            f"{r['nft']['train_max']:+.4f}", f"{r['ceag']['train_max']:+.4f}",
            f"{r['nft']['test_max']:+.4f}", f"{r['ceag']['test_max']:+.4f}",
            f"{r['nft']['test_accuracy']:.4f}", f"{r['ceag']['test_accuracy']:.4f}", f"{r['seconds']:.0f}",
        ]  # fmt: skip
        lines.append(f"| {r['threads']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_section(settings, rows: list[dict]) -> str:
    flags = " ".join(settings.default_flags)
    command = f"python scripts/run_ceag.py --seed S --output_dir DIR{' ' + flags if flags else ''}"
    eps = rows[0]["tolerance"]
    smallest = min(r["ceag"]["min_train_n"] for r in rows)
    return "\n\n".join(
        [
            "## 0. The default run, as a user runs it",
            (
                f"`{command}` — the README's first command (dense training, NFT, CEAG), one fresh process per "
                f"run with `OMP_NUM_THREADS` set, seeds {', '.join(map(str, settings.default_seeds))} (the seed "
                f"also sets the data). ε = {eps:g}; the smallest training group has {smallest} rows (one image = "
                f"{1 / smallest:.4f} of its accuracy). The default's claims: NFT's train max ψ_g > 2ε, CEAG's "
                "≤ ε, and CEAG's test accuracy within one point of NFT's."
            ),
            default_summary_table(rows),
            default_run_table(rows),
        ]
    )


README_START = "<!-- default-results: generated by scripts/benchmark.py, do not edit -->"
README_END = "<!-- /default-results -->"


def readme_results(argv: list[str], rows: list[dict]) -> str:
    """The README's results block: part 0's summary table, with the command and commit that produced it."""
    command = shlex.join(["python", "scripts/benchmark.py", *argv])
    return (
        f"{README_START}\n"
        f"From `{command}` at commit {_commit()} (BENCHMARKS.md, part 0: one line per run there):\n\n"
        f"{default_summary_table(rows)}\n"
        f"{README_END}"
    )


def update_readme(path: str, block: str) -> None:
    """Replace the README's results block (between its markers) with `block`."""
    with open(path) as f:
        text = f.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {README_START!r} ... {README_END!r} block to update.")
    with open(path, "w") as f:
        f.write(text[:start] + block + text[end + len(README_END) :])


DEVICE_START = (
    "<!-- device-sections: written by scripts/benchmark.py --device_section on each machine, do not edit -->"
)
DEVICE_END = "<!-- /device-sections -->"


def device_block(text: str) -> str:
    """The device sections already in a BENCHMARKS.md text (kept when the CPU benchmark rewrites the file)."""
    start, end = text.find(DEVICE_START), text.find(DEVICE_END)
    return text[start : end + len(DEVICE_END)] if 0 <= start < end else ""


def merge_device_section(path: str, section: str) -> None:
    """Add a section written by `--device_section` (on another machine, e.g. a GPU) to the device block of
    BENCHMARKS.md at `path`, after the sections already there; an identical section is not added twice."""
    with open(path) as f:
        text = f.read()
    block = device_block(text)
    sections = block[len(DEVICE_START) : -len(DEVICE_END)].strip() if block else ""
    if section.strip() in sections:
        return
    merged = "\n\n".join(part for part in (sections, section.strip()) if part)
    new_block = f"{DEVICE_START}\n\n{merged}\n\n{DEVICE_END}"
    text = text.replace(block, new_block) if block else text.rstrip("\n") + "\n\n" + new_block + "\n"
    with open(path, "w") as f:
        f.write(text)


# ---- 1. method table ----


def method_runs(settings, extra: list[str], work: str) -> tuple[list[dict], dict]:
    """Every (variant, seed, sparsity, method) run, one dense model per (variant, seed) reused by all; and the
    first (variant, seed)'s data and dense model, which the other parts reuse."""
    runs, first = [], None
    for variant in settings.variants:
        for seed in settings.seeds:
            base = os.path.join(work, f"{variant}-seed{seed}")
            script, config = run_config(settings, extra, base, seed, variant)
            data, channels = run_ceag.load_data(script, config)
            dense_dir = run_ceag.dense_model(script, config, data, channels)
            processor = image_processor(script.image_size, channels, digits=True)
            first = first or {"config": config, "data": data, "dense_dir": dense_dir}
            for sparsity in settings.sparsities:
                for method in settings.methods:
                    out = os.path.join(base, f"sparsity-{sparsity:g}", method)
                    cfg = method_config(config, method, sparsity, out)
                    report = run_ceag.prune_with(cfg.mitigation, dense_dir, cfg, data, processor)
                    runs.append(_run_row(variant, seed, sparsity, method, report))
    return runs, first


def _run_row(variant: str, seed: int, sparsity: float, method: str, report: dict) -> dict:
    train, test = report["splits"]["train"], report["splits"]["test"]
    judged = sum(g["status"] in ("satisfied", "violated") for g in train["groups"])
    return {
        "variant": variant,
        "seed": seed,
        "sparsity": sparsity,
        "method": method,
        "tolerance": report["tolerance"],
        "test_accuracy": test["accuracy_sparse"],
        "train_max": train["max_excess_gap"],
        "test_max": test["max_excess_gap"],
        "train_spread": train["excess_gap_spread"],
        "violated_fraction": train["violated_groups"] / max(judged, 1),
        "seconds": report["train_seconds"],
        "min_test_n": min(g["n"] for g in test["groups"]),
        "max_multiplier": max(report["multipliers"].values(), default=0.0),
        "dual_steps": report["dual_steps"],
    }


def _cell(values: list[float], digits: int, signed: bool = False) -> str:
    mean = statistics.fmean(values)
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if len(values) < 2 else f"{text} ± {statistics.stdev(values):.{digits}f}"


def _percent(fraction: float) -> str:
    # 0.975 is "97.5%", not "98%"
    return f"{100 * fraction:g}%"


def _settings_of(runs: list[dict]) -> list[tuple[str, float]]:
    return list(dict.fromkeys((r["variant"], r["sparsity"]) for r in runs))


def _select(runs: list[dict], variant: str, sparsity: float, method: str) -> list[dict]:
    return [r for r in runs if (r["variant"], r["sparsity"], r["method"]) == (variant, sparsity, method)]


def method_table(runs: list[dict]) -> str:
    """Markdown table: mean ± std over seeds per (variant, sparsity, method)."""
    lines = [
        (
            "| variant | sparsity | method | test accuracy | train max ψ_g | test max ψ_g | train spread "
            "| train groups over ε | train max ψ_g ≤ ε | final max λ_g | wall time (s) |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, sparsity in _settings_of(runs):
        for method in dict.fromkeys(r["method"] for r in runs):
            rows = _select(runs, variant, sparsity, method)
            if not rows:
                continue
            held = sum(r["train_max"] <= r["tolerance"] for r in rows)
            cells = [
                _cell([r["test_accuracy"] for r in rows], 3),
                _cell([r["train_max"] for r in rows], 3, signed=True),
                _cell([r["test_max"] for r in rows], 3, signed=True),
                _cell([r["train_spread"] for r in rows], 3),
                _cell([r["violated_fraction"] for r in rows], 2),
                f"{held}/{len(rows)}",
                _cell([r["max_multiplier"] for r in rows], 2),
                _cell([r["seconds"] for r in rows], 1),
            ]
            lines.append(
                f"| {variant} | {_percent(sparsity)} | {METHODS[method][0]} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def method_reading(runs: list[dict]) -> list[str]:
    """Plain sentences computed from the runs: who holds ε on train, train vs test, where CEAG does not help."""
    eps = runs[0]["tolerance"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    held = {m: sum(r["train_max"] <= eps for r in rs) for m, rs in by.items()}
    best = [METHODS[m][0] for m in methods if held[m] == max(held.values())]
    counts = ", ".join(f"{METHODS[m][0]} {held[m]}/{len(by[m])}" for m in methods)
    most = f"most often for {' and '.join(best)}" if max(held.values()) else "no method held it in any run"
    sentences = [f"Train max ψ_g ≤ ε (ε = {eps:g}) held in {counts} runs — {most}."]
    test_held = ", ".join(
        f"{METHODS[m][0]} {sum(r['test_max'] <= eps for r in by[m])}/{len(by[m])}" for m in methods
    )
    gaps = ", ".join(
        f"{METHODS[m][0]} {statistics.fmean(r['test_max'] - r['train_max'] for r in by[m]):+.3f}" for m in methods
    )
    sentences.append(
        f"On held-out data it held in {test_held} runs; test max ψ_g minus train max ψ_g averaged {gaps} — "
        "a train-set result is not a guarantee on new data."
    )
    if "ceag" in by and "nft" in by:
        sentences += _ceag_vs_nft(runs, eps)
    smallest = min(r["min_test_n"] for r in runs)
    sentences.append(
        f"The smallest test group has {smallest} images, so one image moves its accuracy by {1 / smallest:.3f}: "
        "test ψ_g values are noisy at this scale."
    )
    return sentences


def _ceag_vs_nft(runs: list[dict], eps: float) -> list[str]:
    def mean(variant, sparsity, method, key):
        return statistics.fmean(r[key] for r in _select(runs, variant, sparsity, method))

    settings = [
        (v, s) for v, s in _settings_of(runs) if _select(runs, v, s, "ceag") and _select(runs, v, s, "nft")
    ]
    name = {(v, s): f"{v} {_percent(s)}" for v, s in settings}
    no_train_gain = [name[c] for c in settings if mean(*c, "ceag", "train_max") >= mean(*c, "nft", "train_max")]
    missed = [name[c] for c in settings if mean(*c, "ceag", "train_max") > eps]
    no_test_gain = [name[c] for c in settings if mean(*c, "ceag", "test_max") >= mean(*c, "nft", "test_max")]
    accuracy_cost = [
        name[c] for c in settings if mean(*c, "ceag", "test_accuracy") < mean(*c, "nft", "test_accuracy") - 0.005
    ]
    beyond_2pt = [
        f"{name[c]} ({mean(*c, 'ceag', 'test_accuracy') - mean(*c, 'nft', 'test_accuracy'):+.3f})"
        for c in settings
        if mean(*c, "ceag", "test_accuracy") < mean(*c, "nft", "test_accuracy") - 0.02
    ]
    time_ratio = statistics.fmean(r["seconds"] for r in runs if r["method"] == "ceag") / statistics.fmean(
        r["seconds"] for r in runs if r["method"] == "nft"
    )

    def listing(items: list[str], none: str, some: str) -> str:
        return none if not items else f"{some}: {', '.join(items)}."

    return [
        f"CEAG's mean train max ψ_g was below NFT's in {len(settings) - len(no_train_gain)} of {len(settings)} "
        + listing(no_train_gain, "settings.", "settings; not in"),
        listing(
            missed,
            "CEAG's mean train max ψ_g was within ε in every setting.",
            "CEAG's mean train max ψ_g stayed above ε in",
        ),
        listing(
            no_test_gain,
            "On test data CEAG's mean max ψ_g was below NFT's in every setting.",
            "Where CEAG does not help on test data (mean test max ψ_g not below NFT's)",
        ),
        listing(
            accuracy_cost,
            "CEAG's mean test accuracy was within 0.005 of NFT's or better in every setting.",
            "CEAG cost more than 0.005 mean test accuracy against NFT in",
        ),
        listing(
            beyond_2pt,
            "CEAG's mean test accuracy was within 0.02 of NFT's (or better) in every setting.",
            "CEAG's mean test accuracy fell more than 0.02 below NFT's in",
        ),
        f"A CEAG run took {time_ratio:.2f}× the wall time of an NFT run on average.",
    ] + _paper_proxy(runs, settings, mean)


def _paper_proxy(runs: list[dict], settings: list[tuple[str, float]], mean) -> list[str]:
    """CEAG with the paper's proxy (overall-loss gradient kept) against the default, setting by setting."""
    settings = [c for c in settings if _select(runs, *c, "ceag-paper")]
    if not settings:
        return []
    cells = [
        f"{v} {_percent(s)}: {mean(v, s, 'ceag-paper', 'test_accuracy'):.3f} vs "
        f"{mean(v, s, 'ceag', 'test_accuracy'):.3f}"
        for v, s in settings
    ]
    return [
        "Test accuracy of CEAG with the paper's proxy (overall-loss gradient kept) vs the default proxy: "
        + "; ".join(cells)
        + "."
    ]


# ---- 2. overhead, 3. group scaling: timed training loops ----


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall-clock time at the end of every optimizer step; optionally profiles the steps after the warm-up."""

    def __init__(self, warmup: int, profiler: cProfile.Profile | None = None) -> None:
        self.warmup, self.profiler, self.times = warmup, profiler, []

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.times.append(time.perf_counter())
        if self.profiler is not None and len(self.times) == self.warmup:
            self.profiler.enable()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.disable()

    def seconds_per_step(self) -> float:
        """Mean time of the steps after the warm-up (from the end of step `warmup` to the end of the last)."""
        steady = self.times[self.warmup - 1 :]
        return (steady[-1] - steady[0]) / (len(steady) - 1)


def train_timed(kind: str, model, args: CEAGConfig, train: datasets.Dataset, warmup: int, profiler=None):
    """Fine-tune a copy of `model` for `args.max_steps` steps; seconds per step after the warm-up, and the
    trainer. `kind` 'plain' is a `transformers.Trainer` (group columns dropped), else a `CEAGTrainer`."""
    set_seed(args.seed)
    timer = StepTimer(warmup, profiler)
    model = copy.deepcopy(model)
    if kind.startswith("plain"):
        data = train.remove_columns([c for c in args.group_columns if c in train.column_names])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    else:
        trainer = CEAGTrainer(model=model, args=args, train_dataset=train, callbacks=[timer])
    trainer.train()
    return timer.seconds_per_step(), trainer


def fine_tune_args(config: CEAGConfig, output_dir: str, steps: int, sparsity: float, mitigation: str, **kw):
    """Fine-tuning of an already pruned model: target sparsity reached at step 0, constraints on from step 0."""
    schedule = {"pruning_method": "magnitude", "pruning_start_epoch": 0.0, "pruning_end_epoch": 0.0}
    return dataclasses.replace(
        config,
        output_dir=output_dir,
        max_steps=steps,
        target_sparsity=sparsity,
        mitigation=mitigation,
        mitigate_during_pruning=True,
        save_strategy="no",
        eval_strategy="no",
        **schedule,
        **kw,
    )


def pruned_model(dense_dir: str, config: CEAGConfig, sparsity: float):
    """The dense model, magnitude-pruned to `sparsity` with the run's scope."""
    model = AutoModelForImageClassification.from_pretrained(dense_dir, use_safetensors=True)
    MagnitudePruner(prunable_parameters(model, config.keep_first_last_dense), config.pruning_scope).prune_to(
        sparsity
    )
    return model


def overhead(settings, context: dict, work: str) -> dict[str, Any]:
    """Seconds per step of plain Trainer, NFT and CEAG on the same pruned model, data and steps: one warm-up
    run each, then `repeats` rounds with the three interleaved (order rotated each round); medians."""
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
    result = {
        "times": times,
        "median": median,
        "ceag_over_nft": median["ceag"] / median["nft"],
        "nft_over_plain": median["nft"] / median["plain"],
        "ceag_over_plain": median["ceag"] / median["plain"],
        "rows": len(train),
        "batch": config.per_device_train_batch_size,
        "buffer_size": config.buffer_size,
        "sparsity": sparsity,
        "profiles": {},
    }
    profiled = {}  # a target missed: profile both sides of its ratio, and show the numerator's top functions
    for key, (numerator, denominator) in (
        ("ceag_over_nft", ("ceag", "nft")),
        ("nft_over_plain", ("nft", "plain")),
    ):
        if result[key] <= TARGETS[key] or settings.device_section:  # cProfile says little about device time
            continue
        for kind in (denominator, numerator):
            if kind not in profiled:
                args = args_for(kind, settings.overhead_steps)
                profiled[kind] = profile(kind, model, args, train, settings.warmup_steps)
        pair = {kind: profiled[kind] for kind in (denominator, numerator)}
        result["profiles"][key] = profile_markdown(pair, SHORT_LABELS, numerator)
    return result


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
    ours = [item for item in stats.items() if "hf_ceag" in item[0][0] or "cooper" in item[0][0]]
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


def tiled_digits(train: datasets.Dataset, min_rows: int) -> datasets.Dataset:
    """The training images and labels repeated until there are at least `min_rows` rows."""
    base = train.remove_columns([c for c in train.column_names if c not in ("pixel_values", "label")])
    return datasets.concatenate_datasets([base] * max(1, math.ceil(min_rows / len(base)))).with_format("torch")


def with_synthetic_groups(tiled: datasets.Dataset, num_groups: int) -> datasets.Dataset:
    """`tiled` with a `group` column: row i belongs to group i mod num_groups."""
    return tiled.add_column("group", [i % num_groups for i in range(len(tiled))]).with_format("torch")


def group_scaling(settings, context: dict, work: str, tiled: datasets.Dataset) -> dict[str, Any]:
    """CEAG seconds per step with each group count over the same tiled data (buffer 2, constraints from step
    0); rounds interleave the group counts (order rotated each round); medians, and each count's ratio to the
    smallest."""
    config, sparsity = context["config"], settings.sparsities[0]
    model = pruned_model(context["dense_dir"], config, sparsity)
    data = {g: with_synthetic_groups(tiled, g) for g in settings.groups}
    times, full = {g: [] for g in settings.groups}, {}
    for repeat in range(settings.scaling_repeats):
        shift = repeat % len(settings.groups)
        for groups in settings.groups[shift:] + settings.groups[:shift]:
            out = os.path.join(work, "scaling", str(groups))
            args = fine_tune_args(config, out, settings.scaling_steps, sparsity, "ceag", buffer_size=2)
            seconds, trainer = train_timed("ceag", model, args, data[groups], settings.warmup_steps)
            times[groups].append(seconds)
            full[groups] = int(trainer.problem.ready.sum())
    median = {g: statistics.median(v) for g, v in times.items()}
    smallest, largest = min(settings.groups), max(settings.groups)
    result = {
        "times": times,
        "median": median,
        "ratio": {g: median[g] / median[smallest] for g in settings.groups},
        "full_buffers": full,
        "rows": len(tiled),
        "smallest": smallest,
        "profile": None,
    }
    if result["ratio"][largest] > TARGETS["groups_10000_over_10"]:
        profiled = {}
        for groups in (smallest, largest):
            out = os.path.join(work, "scaling-profile", str(groups))
            args = fine_tune_args(config, out, settings.scaling_steps, sparsity, "ceag", buffer_size=2)
            profiled[groups] = profile("ceag", model, args, data[groups], settings.warmup_steps)
        labels = {g: f"CEAG, {g:,} groups" for g in profiled}
        result["profile"] = profile_markdown(profiled, labels, largest)
    return result


def fairgrape_cost(settings, context: dict, tiled: datasets.Dataset) -> dict[int, dict[str, float]]:
    """One FairGRAPE round on the dense model at each group count, over the same calibration batches
    (group ids as in the scaling part): importance scoring and greedy selection times, and the magnitude
    pruning time of the same layers."""
    config, sparsity = context["config"], settings.sparsities[0]
    model = AutoModelForImageClassification.from_pretrained(context["dense_dir"], use_safetensors=True)
    model.to(config.device)
    parameters = prunable_parameters(model, config.keep_first_last_dense)
    unpruned = {name: torch.ones_like(p, dtype=torch.bool) for name, p in parameters.items()}
    batch = config.per_device_train_batch_size
    generator = torch.Generator().manual_seed(config.seed)
    rows = torch.randperm(len(tiled), generator=generator)[: settings.calibration_batches * batch]
    calibration = [(tiled[ids.tolist()], ids) for ids in rows.split(batch)]
    start = time.perf_counter()
    magnitude = copy.deepcopy(model)
    pruner = MagnitudePruner(prunable_parameters(magnitude, config.keep_first_last_dense), config.pruning_scope)
    pruner.prune_to(sparsity)
    magnitude_seconds = time.perf_counter() - start
    results = {}
    for groups in settings.fairgrape_groups:
        batches = [
            {"pixel_values": b["pixel_values"], "labels": b["label"], "group_ids": ids % groups}
            for b, ids in calibration
        ]
        start = time.perf_counter()
        importance = group_importance(model, parameters, batches, groups)
        _synchronize()
        scored = time.perf_counter()
        masks = fairgrape_masks(importance, sparsity, unpruned)
        _synchronize()
        results[groups] = {
            "backward_passes": sum(int(b["group_ids"].unique().numel()) for b in batches),
            "importance_seconds": scored - start,
            "selection_seconds": time.perf_counter() - scored,
            "magnitude_seconds": magnitude_seconds,
        }
        if groups == min(settings.fairgrape_groups) and torch.device(config.device).type != "cpu":
            results[groups]["reference_selection_seconds"] = reference_selection(importance, sparsity, masks)
    return results


def reference_selection(importance: dict, sparsity: float, masks: dict) -> float:
    """Seconds of the one-layer-at-a-time greedy (`greedy_select`, what `fairgrape_masks` ran on every device
    before) on the same importance; checks that it keeps the same weights."""
    start = time.perf_counter()
    for name, scores in importance.items():
        layer = scores.reshape(scores.shape[0], -1).float()
        keep = layer.shape[1] - round(sparsity * layer.shape[1])
        kept = greedy_select(layer, keep, target_shares({name: scores})[name], chunk=max(1, round(1e-3 * keep)))
        if not torch.equal(kept.view_as(masks[name]), masks[name]):
            raise RuntimeError(f"FairGRAPE selection of {name} differs from the reference greedy.")
    _synchronize()
    return time.perf_counter() - start


# ---- 4. memory ----


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


def memory(argv: list[str], context: dict, work: str) -> dict[str, dict[str, float]]:
    """Resident memory of an NFT and a CEAG run, each in a fresh subprocess of this script (first variant,
    seed and sparsity of the table, same recipe, reusing its dense model): before the run and at its peak."""
    measured = {}
    for method in ("nft", "ceag"):
        command = [
            sys.executable, os.path.abspath(__file__), *argv, "--memory_child", method,
            "--memory_dense", context["dense_dir"], "--memory_out", os.path.join(work, "memory", method),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines or not lines[-1].startswith("rss_before_mib="):
            raise RuntimeError(f"memory run {method} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        measured[method] = {k: float(v) for k, v in (pair.split("=") for pair in lines[-1].split())}
    return measured


def memory_child(settings, extra: list[str]) -> None:
    """One pruning run of the table (first variant, seed, sparsity); its last line gives the resident memory
    before the run (libraries and data loaded) and the peak."""
    variant, seed, sparsity = settings.variants[0], settings.seeds[0], settings.sparsities[0]
    script, config = run_config(settings, extra, settings.memory_out, seed, variant)
    data, channels = run_ceag.load_data(script, config)
    processor = image_processor(script.image_size, channels, digits=True)
    cfg = method_config(config, settings.memory_child, sparsity, settings.memory_out)
    before, _ = rss_mib()
    run_ceag.prune_with(cfg.mitigation, settings.memory_dense, cfg, data, processor)
    gpu = f" gpu_peak_mib={torch.cuda.max_memory_allocated() / 2**20:.1f}" if torch.cuda.is_available() else ""
    print(f"rss_before_mib={before:.1f} peak_rss_mib={rss_mib()[1]:.1f}{gpu}")


# ---- the document ----


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


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO_ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _verdict(value: float, target: float) -> str:
    return f"target ≤ {target:.2f}: {'met' if value <= target else 'MISSED'}"


def headline(over: dict, scaling: dict, peaks: dict) -> dict[str, float]:
    """The headline ratios, by key."""
    values = {"ceag_over_nft": over["ceag_over_nft"], "nft_over_plain": over["nft_over_plain"]}
    for groups, ratio in scaling["ratio"].items():
        if groups != scaling["smallest"]:
            values[f"groups_{groups}_over_{scaling['smallest']}"] = ratio
    values["ceag_rss_over_nft"] = peaks["ceag"]["peak_rss_mib"] / peaks["nft"]["peak_rss_mib"]
    return values


def setup_section(settings, argv: list[str], seconds: dict[str, float]) -> str:
    recipe = run_ceag.RECIPE_DEFAULTS
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    size = f"{settings.image_size}×{settings.image_size}"
    return "\n".join(
        [
            "## Setup",
            "",
            f"- Command: `{shlex.join(['python', 'scripts/benchmark.py', *argv])}`",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {_commit()}",
            "- Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
            "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
            f"- Run time: {seconds['total']:.0f} s in all ({parts})",
            (
                f"- Recipe (`scripts/run_ceag.py` RECIPE_DEFAULTS, `{settings.model}` at {size}): "
                f"{settings.epochs:g} epochs, target sparsity reached at epoch "
                f"{settings.pruning_end_epoch:g} (cubic, layer-wise, first conv and last linear dense), SGD "
                f"momentum 0.9, lr {recipe['learning_rate']} ({recipe['lr_scheduler_type']}), batch "
                f"{recipe['per_device_train_batch_size']}, "
                f"dual lr {recipe['dual_lr']}, buffer {recipe['buffer_size']} (CEAG, EL+RB), "
                f"ε {recipe['tolerance']}; dense model: {settings.dense_epochs:g} epochs, one per (variant, seed), "
                "reused by every method and sparsity. The seed also sets the train/test split. Data: `styled` = "
                "the embedded default (`hf_ceag.data.styled_digits`: 10,776 augmented training digits, groups plain / "
                "inverted); `imbalanced` = scikit-learn's raw 8×8 digits grouped by digit, 3 and 8 kept at 20 % of "
                "their training rows (26–27 rows)."
            ),
        ]
    )


def overhead_section(settings, over: dict, targets: dict[str, float] | None = None) -> str:
    intro = (
        f"The same pruned model (the first dense model above, magnitude-pruned layer-wise to "
        f"{over['sparsity']:.0%}), the same {over['rows']} training rows, batch {over['batch']}, "
        f"{settings.overhead_steps} optimizer steps per run, every batch full (`dataloader_drop_last`). NFT and "
        "CEAG reach the target sparsity at step 0; "
        f"CEAG's constraints are on from step 0 (buffer {over['buffer_size']}, one dual step per step). Timed "
        f"with a `TrainerCallback` from the end of step {settings.warmup_steps} to the end of the last step: the "
        "training loop only — not the dense-reference pass `CEAGTrainer` makes before training, nor trainer "
        f"set-up. One untimed warm-up run per configuration, then {settings.repeats} round(s) with the "
        "configurations interleaved (order rotated); medians."
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
        "| configuration | ms/step (median) | steps/s | every run (ms/step) |",
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
        lines.append(f"- {labels[key]} step time: **{over[key]:.3f}** ({_verdict(over[key], target)})")
    for key, explanation in over["profiles"].items():
        lines += ["", f"### Profile: {key} missed its target", "", explanation]
    return "\n".join(lines)


def scaling_section(settings, scaling: dict, fairgrape: dict) -> str:
    smallest, largest = scaling["smallest"], max(scaling["ratio"])
    intro = (
        f"CEAG (buffer 2, constraints from step 0) on the digits training set tiled to {scaling['rows']} rows; "
        "row i belongs to group i mod G, so every group has at least 2 rows and only the group count changes. "
        f"{settings.scaling_steps} steps per run, timed after {settings.warmup_steps}; "
        f"{settings.scaling_repeats} round(s) interleaving the group counts; medians. With a buffer of 2, a group "
        "takes dual steps once 2 of its rows have been seen: the last column says how many had by the end."
    )
    lines = [
        "## 3. Cost as groups grow",
        "",
        intro,
        "",
        f"| groups | ms/step (median) | ratio to {smallest} | every run (ms/step) | groups with full buffers |",
        "|---:|---:|---:|---|---:|",
    ]
    for groups, median in scaling["median"].items():
        runs = ", ".join(f"{1000 * t:.1f}" for t in scaling["times"][groups])
        lines.append(
            f"| {groups:,} | {1000 * median:.1f} | {scaling['ratio'][groups]:.3f} | {runs} | "
            f"{scaling['full_buffers'][groups]:,} |"
        )
    if (smallest, largest) == (10, 10000):
        ratio = scaling["ratio"][largest]
        lines += [
            "",
            f"- 10,000 / 10 groups: **{ratio:.3f}** ({_verdict(ratio, TARGETS['groups_10000_over_10'])})",
        ]
    if scaling["profile"]:
        lines += ["", f"### Profile: {largest:,} groups missed the target", "", scaling["profile"]]
    return "\n".join(lines + ["", fairgrape_markdown(settings, fairgrape)])


def fairgrape_markdown(settings, fairgrape: dict) -> str:
    lines = [
        (
            f"FairGRAPE's pruning cost, one round to {settings.sparsities[0]:.0%} on the dense model, over the "
            f"same {settings.calibration_batches} calibration batches (group ids as above): one forward pass per "
            "batch and one backward pass per group present in it to score importance, then the greedy selection."
        ),
        "",
        (
            "| groups | backward passes | importance (s) | selection (s) | total (s) | ratio to fewest groups "
            "| magnitude pruning (s) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = None
    for groups, cost in fairgrape.items():
        total = cost["importance_seconds"] + cost["selection_seconds"]
        base = base or total
        lines.append(
            f"| {groups:,} | {cost['backward_passes']} | {cost['importance_seconds']:.2f} | "
            f"{cost['selection_seconds']:.2f} | {total:.2f} | {total / base:.2f} | "
            f"{cost['magnitude_seconds']:.4f} |"
        )
    for groups, cost in fairgrape.items():
        if "reference_selection_seconds" in cost:
            reference = cost["reference_selection_seconds"]
            speedup = reference / cost["selection_seconds"]
            lines += [
                "",
                f"- Selection with {groups} groups, all layers in lockstep on the device: "
                f"{cost['selection_seconds']:.2f} s; one layer at a time (`greedy_select`, the reference, same "
                f"masks): {reference:.2f} s; speed-up **{speedup:.1f}×** (target ≥ 10×: "
                f"{'met' if speedup >= 10 else 'MISSED'})",
            ]
    return "\n".join(lines)


def memory_section(measured: dict[str, dict[str, float]]) -> str:
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


def document(settings, argv, defaults, runs, over, scaling, fairgrape, peaks, seconds, line) -> str:
    """The whole BENCHMARKS.md."""
    title = "# Benchmarks"
    if settings.quick:
        title += (
            "\n\n> **Quick mode**: miniature settings to check that the script runs; not the committed figures."
        )
    intro = (
        "Generated by `scripts/benchmark.py` — do not edit by hand; rerun the command below. Accuracies and ψ_g "
        "are fractions (0.01 = one point); ψ_g = (dense_g − sparse_g) − (dense − sparse); mean ± std over seeds."
    )
    columns = (
        "Spread = max ψ_g − min ψ_g on train; groups over ε = fraction of train groups with ψ_g > ε; final max λ_g "
        "= the largest Lagrange multiplier when training ended (0 without constraints; one that is still large "
        "means a constraint the run could not meet); wall time = `trainer.train()` (dense-reference pass, "
        "pruning and fine-tuning; FairGRAPE includes its scoring)."
    )
    targets = "Targets: CEAG/NFT ≤ 1.05, NFT/plain ≤ 1.02, 10,000/10 groups ≤ 1.10 (step-time ratios)."
    sections = [
        title,
        intro,
        setup_section(settings, argv, seconds),
        default_section(settings, defaults),
        "## 1. Methods on the embedded data",
        columns,
        method_table(runs),
        "Reading:\n\n" + "\n".join(f"- {s}" for s in method_reading(runs)),
        overhead_section(settings, over),
        scaling_section(settings, scaling, fairgrape),
        memory_section(peaks),
        f"## Headline\n\n{targets}\n\n```\n{line}\n```",
    ]
    return "\n\n".join(sections) + "\n"


# ---- main ----


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run every part, write the markdown, print it, and end with the headline `key=value` line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, extra = parse_settings(argv)
    if settings.memory_child:
        memory_child(settings, extra)
        return {}
    if settings.merge_device_section:
        with open(settings.merge_device_section) as f:
            merge_device_section(settings.output or os.path.join(REPO_ROOT, "BENCHMARKS.md"), f.read())
        return {}
    run_config(settings, extra, "unused", 0, settings.variants[0])  # unknown flags fail now, not after an hour
    output = settings.output or (
        os.path.join(tempfile.mkdtemp(prefix="hf-ceag-quick-"), "BENCHMARKS.md")
        if settings.quick
        else os.path.join(REPO_ROOT, "BENCHMARKS.md")
    )
    work = settings.work_dir or tempfile.mkdtemp(prefix="hf-ceag-bench-")
    seconds, start = {}, time.perf_counter()
    if settings.device_section:
        return device_main(settings, extra, argv, output, work)
    try:
        defaults = default_runs(settings, extra, work)
        seconds["default"] = time.perf_counter() - start
        runs, context = method_runs(settings, extra, work)
        seconds["methods"] = time.perf_counter() - start - sum(seconds.values())
        over = overhead(settings, context, work)
        seconds["overhead"] = time.perf_counter() - start - sum(seconds.values())
        tiled = tiled_digits(context["data"]["train"], 2 * max(settings.groups + settings.fairgrape_groups))
        scaling = group_scaling(settings, context, work, tiled)
        fairgrape = fairgrape_cost(settings, context, tiled)
        seconds["groups"] = time.perf_counter() - start - sum(seconds.values())
        peaks = memory(argv, context, work)
        seconds["memory"] = time.perf_counter() - start - sum(seconds.values())
    finally:
        if not settings.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    seconds["total"] = time.perf_counter() - start
    values = headline(over, scaling, peaks)
    line = " ".join(f"{key}={value:.3f}" for key, value in values.items())
    text = document(settings, argv, defaults, runs, over, scaling, fairgrape, peaks, seconds, line)
    if os.path.isfile(output):  # the device sections were measured elsewhere: keep them
        with open(output) as f:
            kept = device_block(f.read())
        text += f"\n{kept}\n" if kept else ""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(text)
    if os.path.abspath(output) == os.path.join(REPO_ROOT, "BENCHMARKS.md"):
        update_readme(os.path.join(REPO_ROOT, "README.md"), readme_results(argv, defaults))
    print(text)
    print(f"Wrote {output}")
    print(line)
    return values


def device_main(settings, extra: list[str], argv: list[str], output: str, work: str) -> dict[str, float]:
    """`--device_section`: one dense model, then the overhead part (with the compiled kinds if asked) and
    FairGRAPE's cost, written as the accelerator's section of BENCHMARKS.md."""
    start = time.perf_counter()
    try:
        variant, seed = settings.variants[0], settings.seeds[0]
        script, config = run_config(settings, extra, os.path.join(work, f"{variant}-seed{seed}"), seed, variant)
        data, channels = run_ceag.load_data(script, config)
        context = {
            "config": config,
            "data": data,
            "dense_dir": run_ceag.dense_model(script, config, data, channels),
        }
        dense_seconds = time.perf_counter() - start
        over = overhead(settings, context, work)
        fairgrape = {}
        if settings.fairgrape_groups:
            tiled = tiled_digits(context["data"]["train"], 2 * max(settings.fairgrape_groups))
            fairgrape = fairgrape_cost(settings, context, tiled)
    finally:
        if not settings.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    values = {
        "nft_over_plain": over["nft_over_plain"],
        "ceag_over_plain": over["ceag_over_plain"],
        "ceag_over_nft": over["ceag_over_nft"],
    }
    if "ceag+compile" in over["median"]:
        values["compiled_ceag_over_plain"] = over["median"]["ceag+compile"] / over["median"]["plain+compile"]
    line = " ".join(f"{key}={value:.3f}" for key, value in values.items())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    size = f"{settings.image_size}×{settings.image_size}"
    setup = [
        f"## Measured on {gpu}",
        "",
        f"- Command: `{shlex.join(['python', 'scripts/benchmark.py', *argv])}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit "
        f"{os.environ.get('HF_CEAG_COMMIT') or _commit()}",
        "- Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- Model: `{settings.model}` at {size}, dense training {settings.dense_epochs:g} epochs on the "
        f"`{settings.variants[0]}` digits ({dense_seconds:.0f} s); run time {time.perf_counter() - start:.0f} s",
        f"- Targets on a GPU (ResNet-50, 224 px, bf16, batch 128): NFT/plain ≤ {DEVICE_TARGETS['nft_over_plain']}, "
        f"CEAG/plain ≤ {DEVICE_TARGETS['ceag_over_plain']}",
    ]
    ratios = [f"- CEAG / NFT step time: **{over['ceag_over_nft']:.3f}**"]
    if "compiled_ceag_over_plain" in values:
        ratios.append(f"- compiled CEAG / compiled plain step time: **{values['compiled_ceag_over_plain']:.3f}**")
    parts = ["\n".join(setup), overhead_section(settings, over, DEVICE_TARGETS), "\n".join(ratios)]
    text = "\n\n".join(parts + ([fairgrape_markdown(settings, fairgrape)] if fairgrape else []))
    text += f"\n\n```\n{line}\n```\n"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(text)
    print(text)
    print(f"Wrote {output}")
    print(line)
    return values


if __name__ == "__main__":
    main()
