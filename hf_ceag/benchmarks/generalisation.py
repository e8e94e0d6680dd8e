"""Part 5 of BENCHMARKS.md (`--generalisation_section`): does a group's protection hold on data the model has
not seen, and do the multipliers stay stable?

On the default recipe, per seed: NFT and CEAG from one run of the README's command (dense training included),
then CEAG with held-out duals at each `constraint_split`, CEAG with nuPI duals at each dual learning rate, and
CEAG with plain SGD duals at the same dual learning rates, each run in a fresh process with the seed's dense
model copied into its folder (so every variant prunes the same dense model). One row per (seed, variant).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from hf_ceag.benchmarks.document import marked_block, merge_marked_block
from hf_ceag.benchmarks.formatting import cell
from hf_ceag.benchmarks.recipe import Recipe

START, END = (
    "<!-- generalisation-section: written by --generalisation_section -->",
    "<!-- /generalisation-section -->",
)


@dataclass(frozen=True)
class Variant:
    """One configuration of part 5: its name, label and the run_ceag flags that make it."""

    name: str
    label: str
    flags: tuple[str, ...]
    method: str = "ceag"  # the method folder its report is in


def variants(settings, recipe: Recipe) -> list[Variant]:
    """NFT, CEAG (the recipe), held-out duals, nuPI and SGD at each dual learning rate."""
    lr = recipe.defaults["dual_lr"]
    found = [Variant("nft", "NFT", (), "nft"), Variant("ceag", f"CEAG (SGD duals, dual lr {lr:g})", ())]
    found += [
        Variant(f"held-out-{s:g}", f"CEAG, held-out duals ({s:.0%} of rows)", ("--constraint_split", f"{s:g}"))
        for s in settings.constraint_splits
    ]
    for optimizer in ("nupi", "sgd"):
        for dual_lr in settings.stability_dual_lrs:
            if optimizer == "sgd" and dual_lr == lr:
                continue  # that is the CEAG row
            found.append(
                Variant(
                    f"{optimizer}-{dual_lr:g}",
                    f"CEAG, {'nuPI' if optimizer == 'nupi' else 'SGD'} duals, dual lr {dual_lr:g}",
                    ("--dual_optimizer", optimizer, "--dual_lr", f"{dual_lr:g}"),
                )
            )
    return found


def generalisation_runs(recipe: Recipe, settings, extra: list[str], work: str, cwd: str) -> list[dict]:
    """Every (seed, variant) run, two at a time per core pair with one thread each: first the README's command
    per seed (dense model, NFT, CEAG), then the variants, each in its own folder holding a copy of the seed's
    dense model. One row per (seed, variant) from its report.json."""
    os.makedirs(work, exist_ok=True)
    parallel = max(1, (os.cpu_count() or 1))
    base = {seed: os.path.join(work, f"seed{seed}", "base") for seed in settings.default_seeds}
    jobs = [(seed, None, base[seed], ["--methods", "none", "ceag"]) for seed in settings.default_seeds]
    _run_all(recipe, jobs, settings, extra, cwd, parallel)
    chosen = variants(settings, recipe)
    jobs = []
    for seed in settings.default_seeds:
        for variant in chosen[2:]:
            out = os.path.join(work, f"seed{seed}", variant.name)
            if not os.path.isdir(os.path.join(out, "dense")):
                shutil.copytree(os.path.join(base[seed], "dense"), os.path.join(out, "dense"))
            jobs.append((seed, variant, out, ["--methods", "ceag", *variant.flags]))
    seconds = _run_all(recipe, jobs, settings, extra, cwd, parallel)
    rows = []
    for seed in settings.default_seeds:
        for variant in chosen:
            folder = (
                base[seed] if variant.name in ("nft", "ceag") else os.path.join(work, f"seed{seed}", variant.name)
            )
            rows.append(_row(seed, variant, os.path.join(folder, variant.method), seconds.get(folder)))
    return rows


def _run_all(recipe, jobs, settings, extra, cwd, parallel) -> dict[str, float]:
    running, seconds = [], {}
    for seed, variant, out, flags in jobs:
        while len(running) >= parallel:
            seconds.update(_finish(*running.pop(0)))
        command = [
            sys.executable,
            recipe.script,
            "--seed",
            str(seed),
            "--output_dir",
            out,
            "--disable_tqdm",
            "true",
        ]
        command += [*settings.default_flags, *flags, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        os.makedirs(out, exist_ok=True)
        log = open(os.path.join(out, "run.log"), "w")  # noqa: SIM115  (closed by _finish)
        running.append((out, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd), log,
                        time.perf_counter()))  # fmt: skip
    for job in running:
        seconds.update(_finish(*job))
    return seconds


def _finish(out, process, log, start) -> dict[str, float]:
    code = process.wait()
    log.close()
    if code != 0:
        raise RuntimeError(f"python scripts/run_ceag.py --output_dir {out} failed; see {log.name}.")
    return {out: time.perf_counter() - start}


def _row(seed: int, variant: Variant, folder: str, seconds: float | None) -> dict:
    with open(os.path.join(folder, "report.json")) as f:
        report = json.load(f)
    train, test = report["splits"]["train"], report["splits"]["test"]
    multipliers = list(report.get("multipliers", {}).values())
    judged = test.get("judged_groups") or len(test["groups"])
    over = test.get("groups_over_tolerance", test["violated_groups"])
    return {
        "seed": seed,
        "variant": variant.name,
        "label": variant.label,
        "tolerance": report["tolerance"],
        "train_max": train["max_excess_gap"],
        "test_max": test["max_excess_gap"],
        "test_over": over / judged if judged else 0.0,
        "test_accuracy": test["accuracy_sparse"],
        "max_multiplier": max(multipliers, default=0.0),
        "seconds": seconds,
    }


def generalisation_table(rows: list[dict]) -> str:
    """Per variant, mean ± std over seeds."""
    lines = [
        (
            "| variant | seeds | train max ψ_g | test max ψ_g | test groups over ε | test accuracy | final max λ_g "
            "| train max ψ_g ≤ ε |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == name]
        eps = group[0]["tolerance"]
        feasible = sum(r["train_max"] <= eps for r in group)
        cells = [
            cell([r["train_max"] for r in group], 3, signed=True),
            cell([r["test_max"] for r in group], 3, signed=True),
            cell([r["test_over"] for r in group], 2),
            cell([r["test_accuracy"] for r in group], 3),
            cell([r["max_multiplier"] for r in group], 2),
        ]
        lines.append(
            f"| {group[0]['label']} | {len(group)} | " + " | ".join(cells) + f" | {feasible}/{len(group)} |"
        )
    return "\n".join(lines)


def generalisation_goals(rows: list[dict], settings) -> list[str]:
    """The goals of the mitigations of part 5, each with its figures: test max ψ_g at least 25 % lower than CEAG's at test accuracy
    within one point (held-out duals, nuPI); nuPI feasible on train at every dual lr; the spread of final λ."""
    mean = {}
    for r in rows:
        mean.setdefault(r["variant"], []).append(r)

    def avg(name, key):
        return statistics.mean(r[key] for r in mean[name])

    lines = []
    base_test, base_acc = avg("ceag", "test_max"), avg("ceag", "test_accuracy")
    for name in mean:
        if name in ("nft", "ceag") or name.startswith("sgd-"):
            continue
        test, acc = avg(name, "test_max"), avg(name, "test_accuracy")
        lower = 1 - test / base_test if base_test > 0 else 0.0
        met = lower >= 0.25 and acc >= base_acc - 0.01
        lines.append(
            f"- {mean[name][0]['label']}: mean test max ψ_g {test:+.4f} against CEAG's {base_test:+.4f} "
            f"({lower:+.0%} lower; goal ≥ 25 %), mean test accuracy {acc:.4f} against {base_acc:.4f} (goal: within "
            f"0.01): **{'met' if met else 'not met'}**."
        )
    for optimizer, label in (("nupi", "nuPI"), ("sgd", "SGD")):
        names = [f"{optimizer}-{lr:g}" for lr in settings.stability_dual_lrs if f"{optimizer}-{lr:g}" in mean]
        if optimizer == "sgd":
            names = [n if n in mean else "ceag" for n in (f"sgd-{lr:g}" for lr in settings.stability_dual_lrs)]
        if not names:
            continue
        finals = [avg(n, "max_multiplier") for n in names]
        feasible = [sum(r["train_max"] <= r["tolerance"] for r in mean[n]) for n in names]
        runs = [len(mean[n]) for n in names]
        cells = ", ".join(
            f"{lr:g}: final max λ {f:.2f}, train-feasible {k}/{n}"
            for lr, f, k, n in zip(settings.stability_dual_lrs, finals, feasible, runs)
        )
        lines.append(
            f"- {label} duals across dual lr: {cells}; spread of final max λ (max − min of the means) "
            f"{max(finals) - min(finals):.2f}."
            + (
                f" Goal (nuPI feasible on train at every dual lr): **{'met' if all(k == n for k, n in zip(feasible, runs)) else 'not met'}**."
                if optimizer == "nupi"
                else ""
            )
        )
    return lines


def generalisation_section(settings, argv: list[str], rows: list[dict], seconds: float, head: str, when: str,
                           machine: str) -> str:  # fmt: skip
    """Part 5's markdown: command, what was run, the table and the goals, one line per run."""
    per_run = [
        (
            "| seed | variant | train max ψ_g | test max ψ_g | test groups over ε | test accuracy | final max λ_g "
            "| wall time (s) |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        wall = f"{r['seconds']:.0f}" if r["seconds"] is not None else "(with CEAG)"
        per_run.append(
            f"| {r['seed']} | {r['label']} | {r['train_max']:+.4f} | {r['test_max']:+.4f} | {r['test_over']:.2f} "
            f"| {r['test_accuracy']:.4f} | {r['max_multiplier']:.2f} | {wall} |"
        )
    flags = " ".join(settings.default_flags)
    return "\n\n".join(
        [
            START,
            "## 5. Held-out duals and nuPI: protection on unseen data, and stable multipliers",
            (
                f"- Command: `python scripts/benchmark.py {' '.join(argv)}`\n- Date: {when}; commit {head}\n"
                f"- Machine: {machine}\n- Run time: {seconds / 60:.0f} min"
            ),
            (
                f"The default recipe (`python scripts/run_ceag.py --seed S{' ' + flags if flags else ''}`), seeds "
                f"{', '.join(map(str, settings.default_seeds))}, one thread per run. NFT and CEAG come from one run "
                "of that command per seed; every other row is CEAG with one change, pruning the same dense model "
                "(copied from that run). Held-out duals keep the given share of the training rows (stratified by "
                "group) out of the primal step and take the dual step's estimates from the model's predictions on "
                "them; their 'train' figures are on the rows the primal step trained on. Test = the recipe's test "
                "split, never trained on. Test groups over ε = the fraction of test groups whose ψ_g (point "
                "estimate) exceeds ε; final max λ_g = the largest multiplier when training ended. Mean ± std over "
                "seeds."
            ),
            generalisation_table(rows),
            "\n".join(generalisation_goals(rows, settings)),
            "One line per run:",
            "\n".join(per_run),
            END,
        ]
    )


def section_block(text: str) -> str:
    """The part-5 block already in a BENCHMARKS.md text (kept when the rest of the file is rewritten)."""
    return marked_block(text, START, END)


def merge_section(path: str, section: str) -> None:
    """Put `section` into BENCHMARKS.md at `path`, replacing the part-5 block if there is one, else before the
    device sections (or at the end)."""
    merge_marked_block(path, section, START, END)
