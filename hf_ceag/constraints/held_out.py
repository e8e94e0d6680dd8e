"""Held-out duals (Cotter et al. 2019): the dual step's estimates come from the model's predictions on rows the
primal step never trains on.

Each micro-batch draws one batch of the held-out rows, with replacement, from a generator seeded by the run's
seed, the micro-batch's index in the run (optimizer step × accumulation + micro-batch) and the process: the same
rows whatever the number of resumes, and a different share on every process (the trainer gathers them). The
model predicts them in eval mode (the deployed model), without gradients, and without DDP's wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import nn

from ..data.encoding import LABEL_COLUMNS
from ..data.groups import GROUP_ID_COLUMN
from ..models.classifiers import classifier_logits


class HeldOutRows:
    """The held-out rows of a run and how to predict a batch of them.

    `collate` turns the fetched rows into a batch (the Trainer's data collator), `prepare` moves it to the device
    (the Trainer's `_prepare_inputs`); `not_inputs` are the batch keys the model must not see."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_size: int,
        seed: int,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        prepare: Callable[[dict[str, Any]], dict[str, Any]],
        not_inputs: tuple[str, ...],
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("HeldOutRows: the held-out dataset is empty; raise constraint_split or set it to 0.")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.collate, self.prepare, self.not_inputs = collate, prepare, not_inputs

    def rows(self, draw: int, process: int = 0) -> torch.Tensor:
        """The row indices of draw number `draw` on process `process` (deterministic in all three)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + draw) * 1_009 + process)
        return torch.randint(len(self.dataset), (self.batch_size,), generator=generator)

    @torch.no_grad()
    def predict(self, model: nn.Module, draw: int, process: int = 0) -> tuple[torch.Tensor, ...]:
        """Group ids, correctness and per-sample cross-entropy of the model's eval-mode predictions on draw
        `draw` (the model's training flag is restored)."""
        # the whole draw in one call: rows from a `datasets.Dataset`, columns from `ColumnBatches` (data/batches.py)
        batch = self.prepare(self.collate(self.dataset.__getitems__(self.rows(draw, process).tolist())))
        labels = next(batch[k] for k in LABEL_COLUMNS if k in batch)
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            outputs = model(**{k: v for k, v in batch.items() if k not in self.not_inputs})
        finally:
            for module, mode in modes.items():
                module.training = mode  # per module: model.train() would also wake modules kept in eval
        logits = classifier_logits(outputs, model).float()
        losses = F.cross_entropy(logits, labels, reduction="none")
        return batch[GROUP_ID_COLUMN].reshape(-1).long(), logits.argmax(dim=-1) == labels, losses
