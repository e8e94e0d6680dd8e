"""Part 3 of BENCHMARKS.md: CEAG's step time as the number of groups grows (10 to 10,000 synthetic groups over
the tiled digits), and FairGRAPE's pruning cost (importance scoring and greedy selection) at each group count."""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from typing import Any

import datasets
import torch

from hf_ceag import MagnitudePruner, prunable_parameters
from hf_ceag.benchmarks.formatting import verdict
from hf_ceag.benchmarks.profiling import profile, profile_markdown
from hf_ceag.benchmarks.settings import TARGETS
from hf_ceag.benchmarks.timing import fine_tune_args, paired_ratio, pruned_model, synchronize, train_timed
from hf_ceag.models.classifiers import load_classifier
from hf_ceag.pruning.fairgrape import fairgrape_masks, greedy_select, group_importance, target_shares


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
    smallest (the median over rounds of the ratio within each round, `paired_ratio`)."""
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
        "ratio": {g: paired_ratio(times[g], times[smallest])[0] for g in settings.groups},
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
    model = load_classifier(context["dense_dir"])
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
        synchronize()
        scored = time.perf_counter()
        masks = fairgrape_masks(importance, sparsity, unpruned)
        synchronize()
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
    synchronize()
    return time.perf_counter() - start


def scaling_section(settings, scaling: dict, fairgrape: dict) -> str:
    """Part 3's markdown from `group_scaling`'s and `fairgrape_cost`'s results."""
    smallest, largest = scaling["smallest"], max(scaling["ratio"])
    intro = (
        f"CEAG (buffer 2, constraints from step 0) on the digits training set tiled to {scaling['rows']} rows; "
        "row i belongs to group i mod G, so every group has at least 2 rows and only the group count changes. "
        f"{settings.scaling_steps} steps per run, timed after {settings.warmup_steps}; "
        f"{settings.scaling_repeats} round(s) interleaving the group counts; a run's ms/step is the median of its "
        "steps, a count's the median of its runs, a ratio the median over rounds of the ratio within each round. "
        "With a buffer of 2, a group takes dual steps once 2 of its rows have been seen: the last column says "
        "how many had by the end."
    )
    lines = [
        "## 3. Cost as groups grow",
        "",
        intro,
        "",
        f"| groups | ms/step (median) | ratio to {smallest} | every run (median ms/step) | groups with full buffers |",
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
            f"- 10,000 / 10 groups: **{ratio:.3f}** ({verdict(ratio, TARGETS['groups_10000_over_10'])})",
        ]
    if scaling["profile"]:
        lines += ["", f"### Profile: {largest:,} groups missed the target", "", scaling["profile"]]
    return "\n".join(lines + ["", fairgrape_markdown(settings, fairgrape)])


def fairgrape_markdown(settings, fairgrape: dict) -> str:
    """FairGRAPE's cost per group count as markdown, with the device selection's speed-up where measured."""
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
                (
                    f"- Selection with {groups} groups, all layers in lockstep on the device: "
                    f"{cost['selection_seconds']:.2f} s; one layer at a time (`greedy_select`, the reference, "
                    f"same masks): {reference:.2f} s; speed-up **{speedup:.1f}×** (target ≥ 10×: "
                    f"{'met' if speedup >= 10 else 'MISSED'})"
                ),
            ]
    return "\n".join(lines)
