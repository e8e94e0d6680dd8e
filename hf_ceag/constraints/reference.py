"""The dense model's reference statistics on the training set: per-group and overall accuracy and loss.

Computed once before pruning (eval mode, one pass), they are the fixed Acc(θ_d | D_g) and L(θ_d | D_g) of
the constraints (DESIGN §2.2–2.3). Accuracies are fractions.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

REFERENCE_FILE = "dense_reference.json"


@dataclass
class DenseReference:
    """Dense-model statistics per group (lists indexed by group id) and overall; `parent_sparsity`, the fraction
    of exact zeros in the dense model's prunable layers before pruning (None where it was not measured)."""

    group_names: list[str]
    group_counts: list[int]
    group_accuracy: list[float]
    group_loss: list[float]
    accuracy: float = field(init=False)
    loss: float = field(init=False)
    parent_sparsity: float | None = None

    def __post_init__(self) -> None:
        n = len(self.group_names)
        if not (len(self.group_counts) == len(self.group_accuracy) == len(self.group_loss) == n):
            raise ValueError(
                "DenseReference: group_names, group_counts, group_accuracy, group_loss differ in length."
            )
        if any(c < 1 for c in self.group_counts):
            raise ValueError("DenseReference: every group needs at least one training sample.")
        total = sum(self.group_counts)
        self.accuracy = sum(a * c for a, c in zip(self.group_accuracy, self.group_counts)) / total
        self.loss = sum(v * c for v, c in zip(self.group_loss, self.group_counts)) / total

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @classmethod
    def from_predictions(
        cls, logits: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor, group_names: list[str]
    ) -> DenseReference:
        """Per-group mean accuracy and cross-entropy from the dense model's logits on the training set."""
        num_groups = len(group_names)
        group_ids = group_ids.long()
        correct = (logits.argmax(dim=-1) == labels).double()
        losses = F.cross_entropy(logits.double(), labels.long(), reduction="none")
        counts = torch.bincount(group_ids, minlength=num_groups)
        empty = [group_names[g] for g in torch.nonzero(counts == 0).flatten().tolist()]
        if empty:
            raise ValueError(f"DenseReference: group(s) {empty} have no training samples.")
        accuracy = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, correct) / counts
        loss = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, losses) / counts
        return cls(list(group_names), counts.tolist(), accuracy.tolist(), loss.tolist())

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Float32 tensors on `device`: group_accuracy, group_loss, group_weights (training shares)."""
        counts = torch.tensor(self.group_counts, dtype=torch.float64)
        return {
            "group_accuracy": torch.tensor(self.group_accuracy, dtype=torch.float32, device=device),
            "group_loss": torch.tensor(self.group_loss, dtype=torch.float32, device=device),
            "group_weights": (counts / counts.sum()).to(device=device, dtype=torch.float32),
        }

    def save(self, directory: str) -> str:
        """Write `dense_reference.json` into `directory`; return its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, REFERENCE_FILE)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
        return path

    @classmethod
    def load(cls, path: str) -> DenseReference:
        """Read a `dense_reference.json` (a file or the folder that holds it)."""
        if os.path.isdir(path):
            path = os.path.join(path, REFERENCE_FILE)
        with open(path) as f:
            data = json.load(f)
        data.pop("accuracy", None)
        data.pop("loss", None)
        reference = cls(**data)
        if not all(math.isfinite(v) for v in reference.group_loss):
            raise ValueError(f"{path}: dense reference has non-finite losses.")
        return reference


CHANCE_MARGIN = 0.05  # a dense model must beat the most frequent class's share by more than this


def check_dense_model_is_trained(accuracy: float, labels: torch.Tensor, allow_weak: bool) -> None:
    """Refuse a dense model at or near chance on its own training data (accuracy ≤ the most frequent class's share
    + `CHANCE_MARGIN`), before any pruning: every ψ_g measured against it would be meaningless (an untrained model,
    or the wrong checkpoint), and a sparse model at chance too would satisfy every constraint."""
    labels = labels.long().reshape(-1)
    if allow_weak or labels.numel() == 0:
        return
    chance = float(torch.bincount(labels).max()) / labels.numel()
    if accuracy <= chance + CHANCE_MARGIN:
        raise ValueError(
            f"The dense model's training accuracy is {accuracy:.3f}, at most {CHANCE_MARGIN:.2f} above chance "
            f"({chance:.3f}, the most frequent class's share): it looks untrained, and pruning it would audit "
            "nothing. Pass the trained dense model (e.g. train it first with transformers.Trainer), or set "
            "allow_weak_dense_model=True to prune it anyway."
        )
