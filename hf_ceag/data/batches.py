"""Batches fetched as columns.

A `datasets.Dataset` formats a batch of rows as columns (`dataset[indices]`), its `__getitems__` cuts them into
one dict per row, and the Trainer's `default_data_collator` stacks the rows back into columns: a tensor cut and
re-stacked per row and column, about 0.3 ms a batch of 64 on a CPU for the group ids alone (measured with the
embedded digits). `ColumnBatches` hands the formatted columns to `ColumnCollator` instead, which builds the batch
`default_data_collator` builds from the rows (`tests/test_batches.py` compares both), one call per column.

`CEAGTrainer` uses it when it collates with the Trainer's default collator and samples at random or in order; a
collator of the user's gets rows, as from the `Trainer`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.data.data_collator import default_data_collator


class Columns(dict):
    """One batch as the dataset formatted it: column name → the column's values (a tensor or a list)."""


class ColumnBatches(torch.utils.data.Dataset):
    """A `datasets.Dataset` whose batches the `DataLoader` fetches as `Columns` (rows still by `[index]`)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> Columns:
        return Columns(self.dataset[list(indices)])


class ColumnCollator:
    """`default_data_collator` for `Columns`; a list of rows goes to `rows_collator`."""

    def __init__(self, rows_collator=default_data_collator) -> None:
        self.rows_collator = rows_collator

    def __call__(self, batch) -> dict[str, Any]:
        return collate_columns(batch) if isinstance(batch, Columns) else self.rows_collator(batch)


def collate_columns(columns: dict[str, Any]) -> dict[str, Any]:
    """The batch `default_data_collator` makes of the rows of `columns`: `label` (or `label_ids`) as `labels`
    (long for integer labels, else float), every other column stacked; columns whose first value is None or a
    string are left out."""
    batch: dict[str, Any] = {}
    label = next((k for k in ("label", "label_ids") if k in columns and _first(columns[k]) is not None), None)
    if label == "label":
        values, first = columns[label], _first(columns[label])
        first = first.item() if isinstance(first, torch.Tensor) else first
        dtype = torch.long if isinstance(first, (int, np.integer)) else torch.float
        batch["labels"] = (
            values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        )
    elif label == "label_ids":
        values, first = columns[label], _first(columns[label])
        if isinstance(values, torch.Tensor):
            batch["labels"] = values
        elif isinstance(first, torch.Tensor):
            batch["labels"] = torch.stack(list(values))
        else:
            dtype = torch.long if isinstance(first[0], (int, np.integer)) else torch.float
            batch["labels"] = torch.tensor(values, dtype=dtype)
    for name, values in columns.items():
        first = _first(values)
        if name in ("label", "label_ids") or first is None or isinstance(first, str):
            continue
        if isinstance(values, torch.Tensor):
            batch[name] = values
        elif isinstance(first, torch.Tensor):
            batch[name] = torch.stack(list(values))
        elif isinstance(first, np.ndarray):
            batch[name] = torch.from_numpy(np.stack(values))
        else:
            batch[name] = torch.tensor(values)
    return batch


def _first(values: Any) -> Any:
    return values[0] if len(values) else None


class GroupIdCollator:
    """A user's `data_collator` with the group ids carried around it: it gets the rows as from the `Trainer`, and
    when its batch lacks `GROUP_ID_COLUMN` (a collator that builds only `pixel_values` and `labels`, as
    transformers' example scripts do), the rows' ids are added to it."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, rows) -> dict[str, Any]:
        from .groups import GROUP_ID_COLUMN

        batch = self.collator(rows)
        if GROUP_ID_COLUMN in batch or isinstance(rows, Columns):
            return batch
        ids = [row.get(GROUP_ID_COLUMN) for row in rows]
        if any(i is None for i in ids):
            return batch  # a dataset transform dropped them: `check_collated_batch` says so before training
        batch[GROUP_ID_COLUMN] = torch.as_tensor([int(i) for i in ids], dtype=torch.long)
        return batch


def check_collated_batch(rows: list[dict], collator, label_columns: tuple[str, ...]) -> None:
    """Collate the first training rows (`rows`, as the training dataloader reads them) as the training dataloader
    will, and refuse, before any long work, a batch without labels or group ids. The random number generators
    are left as they were (a random collator draws from them)."""
    from .groups import GROUP_ID_COLUMN
    from .streaming import random_states_kept

    with random_states_kept():
        batch = collator(list(rows))
    keys = list(batch.keys()) if hasattr(batch, "keys") else type(batch).__name__
    if not any(k in batch for k in label_columns):
        raise ValueError(
            f"CEAGTrainer: a training batch from the data_collator has no labels (keys: {keys}); expected one of "
            f"{label_columns}. Make the collator (or the dataset transform) return the class ids as 'labels'."
        )
    if GROUP_ID_COLUMN not in batch:
        raise ValueError(
            f"CEAGTrainer: a training batch has no {GROUP_ID_COLUMN!r} (keys: {keys}): the dataset's transform or "
            "the data_collator dropped each row's group id. Return the rows' other columns from the transform "
            "(add to the batch it is given rather than building a new dict), or keep that column in the collator."
        )
