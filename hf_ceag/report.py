"""Per-group report of what pruning cost: n, dense and sparse accuracy, ψ_g, per split, as `report.json`.

Every figure comes from per-sample correctness of the dense and the sparse model on the same rows, so the
report, the printed table and (later) the model card read one computation.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .gaps import excess_gaps

REPORT_FILE = "report.json"


def split_report(
    group_ids: torch.Tensor,
    dense_correct: torch.Tensor,
    sparse_correct: torch.Tensor,
    group_names: list[str],
    tolerance: float,
    num_constrained_groups: int | None = None,
) -> dict[str, Any]:
    """Report for one split: overall accuracies, max ψ_g, and one entry per group present in the split.

    ψ_g = (Acc_dense(g) − Acc_sparse(g)) − (Acc_dense − Acc_sparse), accuracies as fractions of the split's
    rows. Groups with id >= `num_constrained_groups` (absent from training) are marked unconstrained and
    left out of `max_excess_gap`.
    """
    num_groups = len(group_names)
    num_constrained = num_groups if num_constrained_groups is None else num_constrained_groups
    group_ids = group_ids.long()
    dense_correct, sparse_correct = dense_correct.double(), sparse_correct.double()
    counts = torch.bincount(group_ids, minlength=num_groups)
    zeros = torch.zeros(num_groups, dtype=torch.float64)
    dense_group = zeros.index_add(0, group_ids, dense_correct) / counts.clamp(min=1)
    sparse_group = zeros.index_add(0, group_ids, sparse_correct) / counts.clamp(min=1)
    dense_overall, sparse_overall = dense_correct.mean(), sparse_correct.mean()
    psi = excess_gaps(dense_group, sparse_group, dense_overall, sparse_overall)
    groups = []
    for g in torch.nonzero(counts > 0).flatten().tolist():
        groups.append(
            {
                "name": group_names[g],
                "n": int(counts[g]),
                "accuracy_dense": float(dense_group[g]),
                "accuracy_sparse": float(sparse_group[g]),
                "excess_gap": float(psi[g]),
                "constrained": g < num_constrained,
            }
        )
    constrained_gaps = [entry["excess_gap"] for entry in groups if entry["constrained"]]
    max_gap = max(constrained_gaps) if constrained_gaps else float("nan")
    return {
        "n": int(group_ids.numel()),
        "accuracy_dense": float(dense_overall),
        "accuracy_sparse": float(sparse_overall),
        "max_excess_gap": max_gap,
        "satisfied": bool(max_gap <= tolerance),
        "groups": groups,
    }


def build_report(
    method: str,
    tolerance: float,
    target_sparsity: float,
    sparsity: float,
    splits: dict[str, dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """The `report.json` document: run settings plus one `split_report` per split."""
    return {
        "method": method,
        "tolerance": tolerance,
        "target_sparsity": target_sparsity,
        "sparsity": sparsity,
        **extra,
        "splits": splits,
    }


def save_report(report: dict[str, Any], directory: str) -> str:
    """Write `report.json` into `directory`; return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, REPORT_FILE)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path


def format_report(report: dict[str, Any]) -> str:
    """Plain-text tables, one per split: per group n, dense and sparse accuracy, ψ_g, and the verdict."""
    eps = report["tolerance"]
    lines = [
        f"method={report['method']}  tolerance={eps:g}  target_sparsity={report['target_sparsity']:g}  "
        f"sparsity={report['sparsity']:.4f}"
    ]
    for split, data in report["splits"].items():
        lines.append(
            f"[{split}] n={data['n']}  accuracy dense={data['accuracy_dense']:.4f} "
            f"sparse={data['accuracy_sparse']:.4f}  max excess gap={data['max_excess_gap']:+.4f}  "
            f"max <= eps: {'yes' if data['satisfied'] else 'NO'}"
        )
        lines.append(f"  {'group':<20} {'n':>6} {'dense':>7} {'sparse':>7} {'excess_gap':>11}")
        for g in data["groups"]:
            flag = "" if g["constrained"] else "  (unconstrained: not in training data)"
            over = "  > eps" if g["constrained"] and g["excess_gap"] > eps else ""
            lines.append(
                f"  {g['name'][:20]:<20} {g['n']:>6} {g['accuracy_dense']:>7.4f} {g['accuracy_sparse']:>7.4f} "
                f"{g['excess_gap']:>+11.4f}{over}{flag}"
            )
    return "\n".join(lines)
