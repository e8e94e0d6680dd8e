"""Per-group report of what pruning cost, from one evaluation pass: `report.json`, a markdown table, a plot.

For every group of a split: n, dense and sparse accuracy (95 % Wilson intervals), Δ_g, ψ_g (95 % bootstrap
interval) and a status (`gap_status`: satisfied, inconclusive or violated, from that interval against ε);
for the split: overall accuracies, max ψ_g, the spread max ψ_g − min ψ_g, the number of groups of each status
and a plain verdict. Every figure comes from the per-sample correctness of the
dense and the sparse model on the same rows, so the logs, the report and the model card read one
computation.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from ..constraints.gaps import excess_gaps
from ..pruning.magnitude import sparsity_definition

REPORT_FILE = "report.json"
PLOT_FILE = "excess_gaps.png"
Z_95 = 1.959963984540054
INTERVAL_LEVEL = 0.95  # of the ψ_g bootstrap interval that decides a group's status

SATISFIED, INCONCLUSIVE, VIOLATED = "satisfied", "inconclusive", "violated"
TOO_FEW, UNCONSTRAINED = "too few samples", "unconstrained"
JUDGED = (SATISFIED, INCONCLUSIVE, VIOLATED)


def wilson_interval(
    successes: torch.Tensor, n: torch.Tensor, z: float = Z_95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wilson score interval for a binomial proportion, elementwise:

    (p̂ + z²/2n ± z √(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n);  [0, 1] when n = 0.
    """
    successes, n = successes.double(), n.double()
    safe_n = n.clamp(min=1)
    p = successes / safe_n
    denominator = 1 + z**2 / safe_n
    center = (p + z**2 / (2 * safe_n)) / denominator
    half = z * torch.sqrt(p * (1 - p) / safe_n + z**2 / (4 * safe_n**2)) / denominator
    empty = n == 0
    return torch.where(empty, 0.0, center - half).clamp(0, 1), torch.where(empty, 1.0, center + half).clamp(0, 1)


def bootstrap_gap_intervals(
    group_ids: torch.Tensor,
    dense_correct: torch.Tensor,
    sparse_correct: torch.Tensor,
    num_groups: int,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> torch.Tensor:
    """Percentile bootstrap interval of every ψ_g, `[num_groups, 2]`.

    Rows are resampled with replacement within each group (group sizes fixed), keeping each row's dense and
    sparse correctness paired. A group's resample only needs the counts of its four (dense, sparse)
    correctness cells, drawn as a chain of binomials, so all groups and resamples are drawn at once.
    """
    cell = 2 * dense_correct.long() + sparse_correct.long()  # 0: both wrong .. 3: both right
    counts = torch.bincount(group_ids.long() * 4 + cell, minlength=4 * num_groups).view(num_groups, 4).double()
    n = counts.sum(dim=1)
    probs = counts / n.clamp(min=1).unsqueeze(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        remaining = n.expand(samples, num_groups).clone()
        left = torch.ones(num_groups, dtype=torch.float64)
        draws = []
        for c in range(3):
            p = (probs[:, c] / left.clamp(min=1e-12)).clamp(0, 1)
            x = torch.distributions.Binomial(total_count=remaining, probs=p.expand_as(remaining)).sample()
            draws.append(x)
            remaining = remaining - x
            left = left - probs[:, c]
        draws.append(remaining)
    dense = draws[2] + draws[3]
    sparse = draws[1] + draws[3]
    total = n.sum().clamp(min=1)
    psi = excess_gaps(
        dense / n.clamp(min=1),
        sparse / n.clamp(min=1),
        dense.sum(1, keepdim=True) / total,
        sparse.sum(1, keepdim=True) / total,
    )
    tail = (1 - level) / 2
    return torch.quantile(psi, torch.tensor([tail, 1 - tail], dtype=torch.float64), dim=0).T


def gap_status(excess_gap: float, interval: list[float] | None, tolerance: float) -> str:
    """Status of a judged group's ψ_g against ε, from its interval [lo, hi] when there is one.

    The constraint is ψ_g ≤ ε, so an endpoint equal to ε lies within it: 'satisfied' when hi ≤ ε, 'violated'
    when lo > ε, 'inconclusive' when lo ≤ ε < hi (the interval straddles ε). Without an interval (a report
    made with `bootstrap_samples=0`), the point estimate decides: 'satisfied' when ψ_g ≤ ε, else 'violated'.
    """
    low, high = (excess_gap, excess_gap) if interval is None else interval
    if high <= tolerance:
        return SATISFIED
    return VIOLATED if low > tolerance else INCONCLUSIVE


def split_report(
    group_ids: torch.Tensor,
    dense_correct: torch.Tensor,
    sparse_correct: torch.Tensor,
    group_names: list[str],
    tolerance: float,
    num_constrained_groups: int | None = None,
    min_samples: int = 20,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Report for one split, from per-row dense and sparse correctness and group ids.

    ψ_g = (Acc_dense(g) − Acc_sparse(g)) − (Acc_dense − Acc_sparse), accuracies as fractions of the split's
    rows. Status per group: 'too few samples' below `min_samples` rows, 'unconstrained' for groups absent
    from training (id >= `num_constrained_groups`), else judged by `gap_status` from the 95 % bootstrap
    interval of ψ_g: 'satisfied', 'inconclusive' or 'violated'. The headline covers every group of the split,
    whatever its status, so that none is left out silently: max ψ_g (with the group and its status), the spread,
    `groups_over_tolerance` (point estimate ψ_g > ε) and `satisfied` (max ψ_g ≤ ε on the point estimates: the
    method's own criterion); the statuses count the judged groups (`satisfied_groups`, `inconclusive_groups`,
    `violated_groups` of `judged_groups`, the constrained ones with enough samples). `accuracy_drop` is the
    overall dense − sparse accuracy: ψ_g is relative, so a model that collapses for every group alike has ψ ≈ 0.
    `bootstrap_samples=0` skips the ψ_g intervals (cheap, for logging): the point estimates then decide the
    statuses (`status_basis` says which).
    """
    num_groups = len(group_names)
    num_constrained = num_groups if num_constrained_groups is None else num_constrained_groups
    group_ids = group_ids.long()
    dense_correct, sparse_correct = dense_correct.double(), sparse_correct.double()
    counts = torch.bincount(group_ids, minlength=num_groups)
    zeros = torch.zeros(num_groups, dtype=torch.float64)
    dense_hits = zeros.index_add(0, group_ids, dense_correct)
    sparse_hits = zeros.index_add(0, group_ids, sparse_correct)
    dense_group, sparse_group = dense_hits / counts.clamp(min=1), sparse_hits / counts.clamp(min=1)
    n_all = torch.tensor(float(group_ids.numel()))
    dense_overall, sparse_overall = dense_correct.sum() / n_all, sparse_correct.sum() / n_all
    psi = excess_gaps(dense_group, sparse_group, dense_overall, sparse_overall)
    dense_ci, sparse_ci = wilson_interval(dense_hits, counts), wilson_interval(sparse_hits, counts)
    psi_ci = (
        bootstrap_gap_intervals(
            group_ids, dense_correct, sparse_correct, num_groups, bootstrap_samples, seed, INTERVAL_LEVEL
        )
        if bootstrap_samples
        else None
    )
    groups = []
    for g in torch.nonzero(counts > 0).flatten().tolist():
        interval = None if psi_ci is None else [float(psi_ci[g, 0]), float(psi_ci[g, 1])]
        if int(counts[g]) < min_samples:
            status = TOO_FEW
        elif g >= num_constrained:
            status = UNCONSTRAINED
        else:
            status = gap_status(float(psi[g]), interval, tolerance)
        entry = {
            "name": group_names[g],
            "n": int(counts[g]),
            "accuracy_dense": float(dense_group[g]),
            "accuracy_dense_ci": [float(dense_ci[0][g]), float(dense_ci[1][g])],
            "accuracy_sparse": float(sparse_group[g]),
            "accuracy_sparse_ci": [float(sparse_ci[0][g]), float(sparse_ci[1][g])],
            "accuracy_change": float(dense_group[g] - sparse_group[g]),
            "excess_gap": float(psi[g]),
            "constrained": g < num_constrained,
            "status": status,
        }
        if interval is not None:
            entry["excess_gap_ci"] = interval
        groups.append(entry)
    judged = [e["excess_gap"] for e in groups if e["status"] in JUDGED]
    gaps = [e["excess_gap"] for e in groups]
    worst = max(groups, key=lambda e: e["excess_gap"]) if groups else None
    max_gap = worst["excess_gap"] if worst else float("nan")
    overall_dense_ci = wilson_interval(dense_correct.sum(), n_all)
    overall_sparse_ci = wilson_interval(sparse_correct.sum(), n_all)
    return {
        "n": int(group_ids.numel()),
        "accuracy_dense": float(dense_overall),
        "accuracy_dense_ci": [float(overall_dense_ci[0]), float(overall_dense_ci[1])],
        "accuracy_sparse": float(sparse_overall),
        "accuracy_sparse_ci": [float(overall_sparse_ci[0]), float(overall_sparse_ci[1])],
        "accuracy_drop": float(dense_overall - sparse_overall),
        # the headline covers every group of the split, judged or not: none can hide behind a flag
        "max_excess_gap": max_gap,
        "max_excess_gap_group": worst["name"] if worst else None,
        "max_excess_gap_status": worst["status"] if worst else None,
        "excess_gap_spread": (max(gaps) - min(gaps)) if gaps else float("nan"),
        "judged_groups": len(judged),
        "satisfied_groups": sum(e["status"] == SATISFIED for e in groups),
        "inconclusive_groups": sum(e["status"] == INCONCLUSIVE for e in groups),
        "violated_groups": sum(e["status"] == VIOLATED for e in groups),
        "groups_over_tolerance": sum(gap > tolerance for gap in gaps),
        "status_basis": "point estimate" if psi_ci is None else f"{INTERVAL_LEVEL:.0%} bootstrap interval",
        # FairGRAPE's disparity metric: population std of the per-group accuracy change (all groups present)
        "accuracy_change_std": float(torch.tensor([e["accuracy_change"] for e in groups]).std(unbiased=False)),
        "too_few_samples_groups": sum(e["status"] == TOO_FEW for e in groups),
        "satisfied": bool(gaps) and max_gap <= tolerance,
        "min_samples": min_samples,
        "groups": groups,
    }


def group_metrics(
    groups: torch.Tensor, dense_correct: torch.Tensor | None, correct: torch.Tensor, group_index, tolerance: float
) -> dict[str, float]:
    """`evaluate()`'s per-group figures from one prediction pass: `accuracy` and `accuracy/<group>`; with the
    dense model's per-sample correctness on the same rows, also `accuracy_drop` (dense − sparse, overall),
    `max_excess_gap` and `excess_gap/<group>`."""
    dense = dense_correct
    if dense is None or dense.numel() != correct.numel():
        dense = correct  # no dense predictions for this data: accuracies only, ψ_g = 0
    data = split_report(
        groups, dense, correct, group_index.names, tolerance,
        num_constrained_groups=group_index.num_groups, min_samples=1, bootstrap_samples=0,
    )  # fmt: skip
    metrics = {"accuracy": data["accuracy_sparse"]}
    for group in data["groups"]:
        metrics[f"accuracy/{group['name']}"] = group["accuracy_sparse"]
    if dense is not correct:
        metrics["accuracy_drop"] = data["accuracy_drop"]
        metrics["max_excess_gap"] = data["max_excess_gap"]
        for group in data["groups"]:
            metrics[f"excess_gap/{group['name']}"] = group["excess_gap"]
    return metrics


def split_descriptions(splits: list[str], constraint_split: float = 0.0) -> dict[str, str]:
    """Which rows each split's figures are computed on, as the report and the card state it."""
    held = constraint_split > 0
    train = (
        f"the training rows the primal step trained on ({1 - constraint_split:.0%} of the training set; the "
        "rest is held out for the dual step)"
        if held
        else "the training rows (the primal step trained on them, and the dual step's estimates came from them)"
    )
    described = {
        "train": train,
        "constraint": f"the {constraint_split:.0%} of the training rows held out from the primal step: the dual "
        "step's estimates came from the model's predictions on them",
    }
    return {name: described.get(name, "evaluation rows, never trained on") for name in splits}


def method_name(args) -> str:
    """The method a `CEAGConfig` runs, as reports and benchmarks name it: fairgrape, nft, el, el+rb or ceag."""
    if args.pruning_method == "fairgrape":
        return "fairgrape"
    if args.mitigation == "none":
        return "nft"
    if args.mitigation == "equalized_loss":
        return "el+rb" if args.buffer_size > 0 else "el"
    return "ceag"


def status_counts(data: dict[str, Any]) -> str:
    """The judged groups of a split counted by status: "2 satisfied, 1 inconclusive, 0 violated of 3 groups"."""
    return (
        f"{data['satisfied_groups']} satisfied, {data['inconclusive_groups']} inconclusive, "
        f"{data['violated_groups']} violated of {data['judged_groups']} judged groups"
    )


def headline(data: dict[str, Any]) -> str:
    """The split's max ψ_g with its group (and that group's status when it is not judged), and the overall accuracy
    drop beside it: "max excess gap +0.1140 (inverted: too few samples); accuracy 0.920 → 0.905 (drop +0.015)"."""
    status = data.get("max_excess_gap_status")
    flag = f": {status}" if status in (TOO_FEW, UNCONSTRAINED) else ""
    group = f" ({data['max_excess_gap_group']}{flag})" if data.get("max_excess_gap_group") is not None else ""
    return (
        f"max excess gap {data['max_excess_gap']:+.4f}{group}; accuracy {data['accuracy_dense']:.3f} → "
        f"{data['accuracy_sparse']:.3f} (drop {data['accuracy_drop']:+.3f})"
    )


def verdict(split: str, data: dict[str, Any], tolerance: float) -> str:
    """One plain sentence on a split: its groups counted by status, what that says about ε, and the headline."""
    held_out = "" if split == "train" else " (held-out data: a check of generalisation, not a guarantee)"
    few = data["too_few_samples_groups"]
    few_text = f"; {few} group(s) have fewer than {data['min_samples']} samples to tell" if few else ""
    if data["judged_groups"] == 0:
        return f"{split}: no group has enough samples to judge; {headline(data)}{held_out}."
    basis = data["status_basis"]
    if data["violated_groups"]:
        reading = (
            f"{data['violated_groups']} group(s) lost more than ε = {tolerance:g} accuracy beyond the model's "
            "overall accuracy loss"
        )
    elif data["inconclusive_groups"]:
        reading = (
            f"no group is shown to lose more than ε = {tolerance:g} accuracy beyond the model's overall accuracy "
            f"loss, but for {data['inconclusive_groups']} group(s) the interval straddles ε: the data cannot tell"
        )
    else:
        reading = f"every judged group lost at most ε = {tolerance:g} more accuracy than the model overall"
    return (
        f"{split}: {status_counts(data)}: {reading} (status by the {basis} of ψ_g); {headline(data)}{few_text}"
        f"{held_out}."
    )


def build_report(
    method: str,
    tolerance: float,
    target_sparsity: float,
    sparsity: float,
    splits: dict[str, dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """The `report.json` document: run settings, one `split_report` per split, and verdicts."""
    for name, data in splits.items():
        data["verdict"] = verdict(name, data, tolerance)
    train = splits.get("train")
    return {
        "method": method,
        "tolerance": tolerance,
        "target_sparsity": target_sparsity,
        "sparsity": sparsity,
        "constraints_satisfied_on_train": None if train is None else train["satisfied"],
        **extra,
        "splits": splits,
    }


def run_report(
    args,
    splits: dict[str, dict[str, Any]],
    pruner,
    group_index,
    problem,
    pruning_seconds: float,
    dense_parent_sparsity: float | None = None,
):
    """The `report.json` document of a `CEAGTrainer` run: `build_report` of its per-split reports with the run's
    settings (`args`, a `CEAGConfig`), the pruner's measured sparsity (overall and per layer, and its
    definition), the dense parent's sparsity before pruning (`dense_parent_sparsity`, same definition; None if
    not measured), the dual steps taken and the final multiplier of every training group."""
    names = group_index.names[: group_index.num_groups]
    multipliers = dict(zip(names, problem.multipliers_tensor().tolist())) if problem is not None else {}
    return build_report(
        method=method_name(args),
        tolerance=args.tolerance,
        target_sparsity=args.target_sparsity,
        sparsity=pruner.sparsity(),
        splits=splits,
        dense_parent_sparsity=dense_parent_sparsity,
        buffer_size=args.buffer_size,
        dual_lr=args.dual_lr,
        constraint_margin=args.constraint_margin if args.mitigation == "ceag" else 0.0,
        pruning_scope=args.pruning_scope,
        group_columns=list(group_index.columns),
        sparsity_definition=sparsity_definition(args.keep_first_last_dense, len(pruner.parameters)),
        layer_sparsity=pruner.layer_sparsity(),
        pruning_method=args.pruning_method,
        pruning_seconds=pruning_seconds,
        dual_steps=problem.dual_steps if problem is not None else 0,
        constraint_split=args.constraint_split,
        max_accuracy_drop=args.max_accuracy_drop,
        split_rows=split_descriptions(list(splits), args.constraint_split),
        multipliers=multipliers,
    )


def save_report(report: dict[str, Any], directory: str) -> str:
    """Write `report.json` into `directory`; return its path. A figure that does not exist (max ψ_g of a split
    with no judged group: NaN) is written as `null`, so the file is valid JSON for any reader."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, REPORT_FILE)
    with open(path, "w") as f:
        json.dump(finite_or_none(report), f, indent=2, allow_nan=False)
    return path


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) in its dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _interval(ci: list[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _headline_group(data: dict[str, Any]) -> str:
    name = data.get("max_excess_gap_group")
    return "" if name is None else f" ({name})"


def report_markdown(report: dict[str, Any], split: str) -> str:
    """Markdown table of one split: per group n, accuracies with intervals, Δ_g, ψ_g with interval, status."""
    data = report["splits"][split]
    rows = [
        (
            "| group | n | dense accuracy [95% CI] | sparse accuracy [95% CI] | accuracy lost Δ_g | excess gap ψ_g "
            "[95% CI] | status |"
        ),
        "|---|---:|---|---|---:|---|---|",
    ]
    for g in data["groups"]:
        rows.append(
            f"| {g['name']} | {g['n']} | {g['accuracy_dense']:.3f}{_interval(g['accuracy_dense_ci'])} | "
            f"{g['accuracy_sparse']:.3f}{_interval(g['accuracy_sparse_ci'])} | {g['accuracy_change']:+.3f} | "
            f"{g['excess_gap']:+.3f}{_interval(g.get('excess_gap_ci'))} | {g['status']} |"
        )
    rows.append(
        f"| **all** | {data['n']} | {data['accuracy_dense']:.3f}{_interval(data['accuracy_dense_ci'])} | "
        f"{data['accuracy_sparse']:.3f}{_interval(data['accuracy_sparse_ci'])} | "
        f"{data['accuracy_drop']:+.3f} | max {data['max_excess_gap']:+.3f}"
        f"{_headline_group(data)}, spread {data['excess_gap_spread']:.3f} | {status_counts(data)} |"
    )
    return "\n".join(rows)


STATUS_COLORS = {
    SATISFIED: "tab:blue",
    INCONCLUSIVE: "tab:orange",
    VIOLATED: "tab:red",
    TOO_FEW: "tab:gray",
    UNCONSTRAINED: "tab:olive",
}


def plot_excess_gaps(report: dict[str, Any], path: str) -> str:
    """PNG: ψ_g per group with 95 % intervals and the ε line, one panel per split, the groups in the same order in
    every panel (by the first split's ψ_g), coloured by status (legend), axes labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    splits = list(report["splits"])
    order = [g["name"] for g in sorted(report["splits"][splits[0]]["groups"], key=lambda g: g["excess_gap"])]
    for split in splits[1:]:  # groups only a later split holds go last
        order += [g["name"] for g in report["splits"][split]["groups"] if g["name"] not in order]
    most = len(order)
    fig, axes = plt.subplots(
        1, len(splits), figsize=(max(6, 0.35 * most) * len(splits), 4.5), squeeze=False, sharey=True
    )
    for ax, split in zip(axes[0], splits):
        by_name = {g["name"]: g for g in report["splits"][split]["groups"]}
        x = [i for i, name in enumerate(order) if name in by_name]
        groups = [by_name[order[i]] for i in x]
        values = [g["excess_gap"] for g in groups]
        ci = [g.get("excess_gap_ci") or [g["excess_gap"]] * 2 for g in groups]
        errors = [[v - c[0] for v, c in zip(values, ci)], [c[1] - v for v, c in zip(values, ci)]]
        ax.bar(
            x, values, color=[STATUS_COLORS.get(g["status"], "tab:blue") for g in groups], yerr=errors, capsize=2
        )
        ax.axhline(report["tolerance"], color="black", linestyle="--")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(range(most), order, rotation=90 if most > 12 else 0, fontsize=8)
        ax.set_title(f"{report['method']} — {split}")
        ax.set_xlabel("group")
        ax.set_ylabel("excess accuracy gap ψ_g (95 % interval)")
        shown = {g["status"] for g in groups}
        handles = [Patch(color=c, label=s) for s, c in STATUS_COLORS.items() if s in shown]
        handles.append(plt.Line2D([], [], color="black", linestyle="--", label=f"ε = {report['tolerance']:g}"))
        ax.legend(handles=handles, loc="upper left", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_report(report: dict[str, Any]) -> str:
    """Plain-text tables for the terminal, one per split, with the verdicts."""
    eps = report["tolerance"]
    target = report["target_sparsity"]  # None for a model pruned elsewhere (scripts/audit.py): not printed
    header = (
        f"method={report['method']}  tolerance={eps:g}  "
        + ("" if target is None else f"target_sparsity={target}  ")
        + f"sparsity={report['sparsity']:.4f}"
    )
    lines = [header]
    for split, data in report["splits"].items():
        lines.append(
            f"[{split}] n={data['n']}  accuracy dense={data['accuracy_dense']:.4f} "
            f"sparse={data['accuracy_sparse']:.4f}  max excess gap={data['max_excess_gap']:+.4f}"
            f"{_headline_group(data)}  "
            f"max <= eps: {'yes' if data['satisfied'] else 'NO'}  {status_counts(data)}"
        )
        lines.append(
            f"  {'group':<20} {'n':>6} {'dense':>7} {'sparse':>7} {'excess_gap':>11} {'interval':>17}  status"
        )
        for g in data["groups"]:
            ci = g.get("excess_gap_ci")
            interval = "" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
            lines.append(
                f"  {g['name'][:20]:<20} {g['n']:>6} {g['accuracy_dense']:>7.4f} {g['accuracy_sparse']:>7.4f} "
                f"{g['excess_gap']:>+11.4f} {interval:>17}  {g['status']}"
            )
        lines.append(f"  {data['verdict']}" if "verdict" in data else "")
    return "\n".join(line for line in lines if line)
