"""Part 1 of BENCHMARKS.md: every method of the table on the embedded data (one dense model per variant and
seed, reused by every method and sparsity), its table of mean ± std over seeds, and the reading computed from it."""

from __future__ import annotations

import os
import statistics

from hf_ceag import image_processor
from hf_ceag.benchmarks.formatting import cell, percent
from hf_ceag.benchmarks.recipe import Recipe
from hf_ceag.benchmarks.settings import METHODS, method_config, run_config


def dense_context(recipe: Recipe, settings, extra: list[str], work: str, variant: str, seed: int) -> dict:
    """The data and dense model of one (variant, seed), trained (or reused) in `work/<variant>-seed<seed>`:
    `config`, `data` and `dense_dir`, which the timed parts reuse, and the recipe's `script` arguments and
    image `channels`."""
    base = os.path.join(work, f"{variant}-seed{seed}")
    script, config = run_config(recipe, settings, extra, base, seed, variant)
    data, channels = recipe.load_data(script, config)
    dense_dir = recipe.dense_model(script, config, data, channels)
    return {"config": config, "data": data, "dense_dir": dense_dir, "script": script, "channels": channels}


def method_runs(recipe: Recipe, settings, extra: list[str], work: str) -> tuple[list[dict], dict]:
    """Every (variant, seed, sparsity, method) run, one dense model per (variant, seed) reused by all; and the
    first (variant, seed)'s `dense_context`, which the other parts reuse."""
    runs, first = [], None
    for variant in settings.variants:
        for seed in settings.seeds:
            base = os.path.join(work, f"{variant}-seed{seed}")
            context = dense_context(recipe, settings, extra, work, variant, seed)
            config, data, dense_dir = context["config"], context["data"], context["dense_dir"]
            processor = image_processor(context["script"].image_size, context["channels"], digits=True)
            first = first or context
            for sparsity in settings.sparsities:
                for method in settings.methods:
                    out = os.path.join(base, f"sparsity-{sparsity:g}", method)
                    cfg = method_config(config, method, sparsity, out)
                    report = recipe.prune_with(cfg.mitigation, dense_dir, cfg, data, processor)
                    runs.append(_run_row(variant, seed, sparsity, method, report))
    return runs, first


def _run_row(variant: str, seed: int, sparsity: float, method: str, report: dict) -> dict:
    train, test = report["splits"]["train"], report["splits"]["test"]
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
        # the table's "train groups over ε": point estimates above ε, as the max ψ_g columns beside it
        "violated_fraction": train["groups_over_tolerance"] / max(train["judged_groups"], 1),
        "seconds": report["train_seconds"],
        "min_test_n": min(g["n"] for g in test["groups"]),
        "max_multiplier": max(report["multipliers"].values(), default=0.0),
        "dual_steps": report["dual_steps"],
    }


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
                cell([r["test_accuracy"] for r in rows], 3),
                cell([r["train_max"] for r in rows], 3, signed=True),
                cell([r["test_max"] for r in rows], 3, signed=True),
                cell([r["train_spread"] for r in rows], 3),
                cell([r["violated_fraction"] for r in rows], 2),
                f"{held}/{len(rows)}",
                cell([r["max_multiplier"] for r in rows], 2),
                cell([r["seconds"] for r in rows], 1),
            ]
            lines.append(f"| {variant} | {percent(sparsity)} | {METHODS[method][0]} | " + " | ".join(cells) + " |")
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
    name = {(v, s): f"{v} {percent(s)}" for v, s in settings}
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
        f"{v} {percent(s)}: {mean(v, s, 'ceag-paper', 'test_accuracy'):.3f} vs "
        f"{mean(v, s, 'ceag', 'test_accuracy'):.3f}"
        for v, s in settings
    ]
    return [
        "Test accuracy of CEAG with the paper's proxy (overall-loss gradient kept) vs the default proxy: "
        + "; ".join(cells)
        + "."
    ]
