"""Streamed data (`datasets.IterableDataset`, e.g. `load_dataset(..., streaming=True)`): read row by row, never held.

A stream has no length and cannot be indexed, so what `CEAGTrainer` reads from a whole table elsewhere comes from
other sources here: the groups are declared before the stream is read (the group columns' `ClassLabel` features,
or `CEAGConfig.group_names`) and a row of any other group fails, naming it; the group id column is added lazily
by a `map`; the number of rows of each group is known once the dense pass has read the training stream; the
first rows are peeked for the checks that need a row. Nothing here iterates a whole stream.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import datasets
import numpy as np
import torch

from .encoding import LABEL_COLUMNS
from .groups import GROUP_ID_COLUMN, GroupIndex
from .preprocessing import same_values

# Rows per call of the map that adds group ids: datasets' default. Measured (one dense pass over a generated stream
# of 200,000 16x16 images, OMP_NUM_THREADS=1): the peak resident memory rose by 63 MiB with 1,000-row batches and by
# 135 MiB with 64-row ones.
MAP_BATCH = 1000


def is_streamed(dataset: Any) -> bool:
    """Whether `dataset` is a `datasets.IterableDataset` (no length, no indexing)."""
    return isinstance(dataset, datasets.IterableDataset)


@contextlib.contextmanager
def random_states_kept():
    """Python's, numpy's and torch's (CPU) random number generators are left as they were on entry: reading rows
    to check them must not change what a random augmentation draws in training."""
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def first_rows(dataset: Any, count: int) -> list[dict]:
    """The first `count` rows of a dataset, map-style or streamed, as the dataloader reads them (random number
    generators kept)."""
    with random_states_kept():
        if is_streamed(dataset):
            return list(dataset.take(count))
        return [dataset[i] for i in range(min(count, len(dataset)))]


def column_names(dataset: Any) -> list[str]:
    """The columns of a stream: from its features where known (a `map` may forget them), else its first row's."""
    names = dataset.column_names
    if names is None:
        rows = first_rows(dataset, 1)
        names = list(rows[0]) if rows else []
    return list(names)


def check_streamed_split(dataset: datasets.IterableDataset, columns: tuple[str, ...], split: str) -> None:
    """Refuse, before any pass, a streamed split without a label column or without a group column, naming the
    columns it has and the fix."""
    names = column_names(dataset)
    if not any(c in names for c in LABEL_COLUMNS):
        raise ValueError(
            f"The streamed {split} dataset has no label column (expected one of {LABEL_COLUMNS}); columns: "
            f"{names}. Rename yours, e.g. dataset.rename_column('<yours>', 'label')."
        )
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(
            f"group_columns: column(s) {missing} are not in the streamed {split} dataset (columns: {names}). Pass "
            f"the column(s) that hold the protected groups, e.g. --group_columns {names[-1] if names else 'group'}."
        )


def encode_stream(index: GroupIndex, dataset: datasets.IterableDataset, split: str) -> datasets.IterableDataset:
    """`dataset` with a `GROUP_ID_COLUMN` of each row's group id in place of its group columns, added lazily as
    rows are read (its formatting kept; the features too, where known). A row of a group that `index` does not
    declare fails when it is read, naming the group (`GroupIndex.group_id`)."""
    check_streamed_split(dataset, index.columns, split)
    features = dataset.features
    column_features = [(features or {}).get(c) for c in index.columns]

    def add_group_ids(batch: dict) -> dict:
        rows = zip(*(_plain(batch[c]) for c in index.columns))
        return {GROUP_ID_COLUMN: [index.group_id(row, column_features, split) for row in rows]}

    raw = [c for c in index.columns if c not in LABEL_COLUMNS]
    encoded_features = None
    if features is not None:
        encoded_features = datasets.Features({k: v for k, v in features.items() if k not in raw})
        encoded_features[GROUP_ID_COLUMN] = datasets.Value("int64")
    # a torch-formatted stream is read as numpy for this map and formatted as torch after it: the same rows, without
    # the torch formatter re-making each tensor the map passes through (slow, and a warning per column)
    formatting = getattr(getattr(dataset, "_formatting", None), "format_type", None)
    source = dataset.with_format("numpy") if formatting == "torch" else dataset
    encoded = source.map(
        add_group_ids, batched=True, batch_size=MAP_BATCH, remove_columns=raw, features=encoded_features
    )
    return encoded.with_format("torch") if formatting == "torch" else encoded


def _plain(values: Any) -> list:
    # a column of group values as Python values: a formatted stream gives a tensor, or a list of 0-d tensors
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return values.tolist()
    return [v.item() if isinstance(v, (torch.Tensor, np.ndarray, np.generic)) else v for v in values]


def stream_is_random(dataset: datasets.IterableDataset, rows: int = 4) -> bool:
    """Whether reading the first `rows` rows of the stream twice gives other values (a random augmentation in
    its `map`); the random number generators are left as they were."""
    with random_states_kept():
        first = list(dataset.take(rows))
        return not same_values(first, list(dataset.take(rows)))


def stream_audit_note(train: datasets.IterableDataset) -> str:
    """What the report says of the training rows of a stream that it audits: a stream's `map` cannot be swapped
    for an evaluation transform, so a random one is said to be random."""
    if not stream_is_random(train):
        return ""
    return (
        "read through the training stream's own map, which is random (the same rows gave other values twice): "
        "train figures are measured on augmented images and move from one pass to the next. Stream the training "
        "rows without augmentation for an exact train audit"
    )
