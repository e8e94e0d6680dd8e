"""Protected groups: from one or more dataset columns to integer group ids and readable names.

Several columns make intersectional groups (one group per combination of values seen in training).
The `GroupIndex` is built once from the training data; evaluation data is encoded with the same ids,
and groups it holds that training lacks get ids after the training groups (they are unconstrained).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch

GROUP_ID_COLUMN = "ceag_group_id"
"""Column the trainer adds to every dataset it is given; holds the integer group id of each row."""


def group_counts(group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """How many of `group_ids` fall in each of `num_groups` groups, `[num_groups]` (long).

    A scatter-add of fixed shape rather than `torch.bincount`, which reads the largest id back to the host
    on CUDA (a synchronisation every training step)."""
    group_ids = group_ids.long().reshape(-1)
    counts = torch.zeros(num_groups, dtype=torch.long, device=group_ids.device)
    return counts.index_add_(0, group_ids, torch.ones_like(group_ids))


def group_means(
    values: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean of `values` (0 for absent groups) and per-group counts, without a loop over groups and
    without a host-device synchronisation."""
    counts = group_counts(group_ids, num_groups)
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, group_ids.long(), values)
    return sums / counts.clamp(min=1).to(values.dtype), counts


class CarryGroupIds:
    """A dataset transform that keeps each row's group id in its output, whatever the user's transform returns
    (one that builds a new dict of `pixel_values` and `labels` would drop it)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        ids = batch.get(GROUP_ID_COLUMN)
        out = self.transform(batch)
        if ids is not None and GROUP_ID_COLUMN not in out:
            out[GROUP_ID_COLUMN] = ids
        return out


def _column_values(dataset: datasets.Dataset, column: str) -> list:
    # Read the raw stored values (no user transform, no torch formatting).
    return list(dataset.with_format(None)[column])


def _value_name(feature, value) -> str:
    if isinstance(feature, datasets.ClassLabel) and 0 <= int(value) < feature.num_classes:
        return feature.int2str(int(value))
    return str(value)


def check_group_columns(dataset: datasets.Dataset, columns: Sequence[str], split: str) -> None:
    """Raise a ValueError naming the column and the fix if a group column is missing or holds nulls."""
    available = [c for c in dataset.column_names if c != GROUP_ID_COLUMN]
    for column in columns:
        if column not in dataset.column_names:
            raise ValueError(
                f"group_columns: column {column!r} is not in the {split} dataset. "
                f"Available columns: {available}. Pass the column(s) that hold the protected groups, "
                f"e.g. --group_columns {available[-1] if available else '<column>'}."
            )
        values = _column_values(dataset, column)
        nulls = sum(v is None or (isinstance(v, float) and math.isnan(v)) for v in values)
        if nulls:
            raise ValueError(
                f"group_columns: column {column!r} of the {split} dataset has {nulls} null or NaN value(s). "
                "Every row needs a group: fill or drop those rows (e.g. dataset.filter(...)) before training."
            )


@dataclass
class GroupIndex:
    """The groups of a training set: their keys (raw column values), names and training counts.

    Group id `i` stands for `keys[i]`, a tuple with one value per column in `columns`. A `declared` index (the
    groups named before the data is read: `declared`) refuses a row of any other group instead of adding it.
    """

    columns: tuple[str, ...]
    keys: list[tuple] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    train_counts: list[int] = field(default_factory=list)
    declared: bool = False

    def __post_init__(self) -> None:
        self.columns = tuple(self.columns)
        if not self.columns:
            raise ValueError("group_columns: give at least one column that holds the protected groups.")
        if not (len(self.keys) == len(self.names) == len(self.train_counts)):
            raise ValueError("GroupIndex: keys, names and train_counts must have the same length.")
        self.keys = [tuple(k) for k in self.keys]
        self._id_of = {key: i for i, key in enumerate(self.keys)}
        # another split may store the same groups as another type (a ClassLabel id here, its name as a string
        # there): rows are matched by their groups' names too
        self._id_of_name = {name: i for i, name in enumerate(self.names)}

    @property
    def num_groups(self) -> int:
        """Number of groups seen in the training data (the constrained groups)."""
        return len(self.train_counts)

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset, columns: Sequence[str]) -> GroupIndex:
        """Index the groups present in `dataset` (the training set), sorted by their column values."""
        check_group_columns(dataset, columns, "train")
        rows = list(zip(*(_column_values(dataset, c) for c in columns)))
        counts: dict[tuple, int] = {}
        for row in rows:
            counts[row] = counts.get(row, 0) + 1
        keys = sorted(counts, key=lambda k: tuple(str(v) if not isinstance(v, int) else v for v in k))
        features = [dataset.features[c] for c in columns]
        names = [" & ".join(_value_name(f, v) for f, v in zip(features, key)) for key in keys]
        return cls(columns=tuple(columns), keys=keys, names=names, train_counts=[counts[k] for k in keys])

    @classmethod
    def declared_groups(cls, features, columns: Sequence[str], group_names: Sequence[str] | None) -> GroupIndex:
        """The groups declared before the data is read (a stream): `group_names` in the order given (with several
        columns, names joined by " & "), else every combination of the group columns' `ClassLabel` names, in
        id order. Training counts are 0 until the data has been read. Refuses data whose groups are not
        declared either way."""
        columns = tuple(columns)
        if group_names:
            if len(set(group_names)) != len(group_names):
                raise ValueError(f"group_names={list(group_names)} names a group twice: give each group once.")
            keys = [tuple(name.split(" & ")) for name in group_names]
            return cls(columns, keys, list(group_names), [0] * len(keys), declared=True)
        labels = [(features or {}).get(c) for c in columns]
        if not all(isinstance(f, datasets.ClassLabel) for f in labels):
            plain = [c for c, f in zip(columns, labels) if not isinstance(f, datasets.ClassLabel)]
            raise ValueError(
                f"group_columns: {plain} of the streamed dataset are not ClassLabel features (or its features are "
                "unknown: a `map` forgets them unless given `features=`), so its groups cannot be known before the "
                "stream is read. Declare them: CEAGConfig(group_names=[...]) (--group_names a b ...), or give the "
                "column a ClassLabel, e.g. dataset.cast_column('group', datasets.ClassLabel(names=[...]))."
            )
        keys = list(itertools.product(*(range(f.num_classes) for f in labels)))
        names = [" & ".join(f.int2str(v) for f, v in zip(labels, key)) for key in keys]
        return cls(columns, keys, names, [0] * len(keys), declared=True)

    def group_id(self, row: tuple, features: Sequence, split: str) -> int:
        """The id of the group of `row` (one value per column; `features` the columns' features or None), matched
        by value, else by name; a group this index lacks is added (unconstrained) unless the index is
        `declared`, which refuses it naming the value."""
        if row in self._id_of:
            return self._id_of[row]
        name = " & ".join(_value_name(f, v) for f, v in zip(features, row))
        if name not in self._id_of_name:
            if self.declared:
                raise ValueError(
                    f"The {split} data holds group {name!r} (columns {list(self.columns)}), which is not one of the "
                    f"declared groups {self.names}: add it to group_names (--group_names), or to the group "
                    "column's ClassLabel names, or drop those rows (dataset.filter(...))."
                )
            self._id_of_name[name] = len(self.keys)
            self.keys.append(row)
            self.names.append(name)
        self._id_of[row] = self._id_of_name[name]
        return self._id_of[row]

    def encode(self, dataset: datasets.Dataset, split: str = "eval") -> datasets.Dataset:
        """Return `dataset` with a `GROUP_ID_COLUMN` column of group ids (transform and format kept).

        A row belongs to the group with the same values, or else with the same name (so a split whose group column
        holds the names of another split's `ClassLabel`, or numbers as strings, is matched group by group). Groups
        absent from training are appended to this index (unconstrained), with a warning naming them.
        """
        check_group_columns(dataset, self.columns, split)
        rows = zip(*(_column_values(dataset, c) for c in self.columns))
        features = [dataset.features[c] for c in self.columns]
        known = len(self.keys)
        ids = [self.group_id(row, features, split) for row in rows]
        unseen = self.names[known:]
        if unseen:
            warnings.warn(
                f"Group(s) {unseen} appear in the {split} data but not in the training data: "
                "they are reported but unconstrained.",
                stacklevel=2,
            )
        if GROUP_ID_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(GROUP_ID_COLUMN)
        fmt = dataset.format
        encoded = dataset.with_format(None).add_column(GROUP_ID_COLUMN, ids)
        columns = None if fmt["columns"] is None else [*fmt["columns"], GROUP_ID_COLUMN]
        if fmt["type"] == "custom":
            transform = fmt["format_kwargs"]["transform"]
            transform = transform if isinstance(transform, CarryGroupIds) else CarryGroupIds(transform)
            encoded.set_transform(transform, columns=columns, output_all_columns=fmt["output_all_columns"])
        else:
            encoded = encoded.with_format(
                fmt["type"], columns=columns, output_all_columns=fmt["output_all_columns"], **fmt["format_kwargs"]
            )
        return encoded

    def to_dict(self) -> dict:
        """JSON-ready description (keys as lists)."""
        return {
            "columns": list(self.columns),
            "keys": [list(k) for k in self.keys],
            "names": list(self.names),
            "train_counts": list(self.train_counts),
            "declared": self.declared,
        }

    @classmethod
    def from_dict(cls, data: dict) -> GroupIndex:
        """Inverse of `to_dict`."""
        return cls(
            columns=tuple(data["columns"]),
            keys=[tuple(k) for k in data["keys"]],
            names=list(data["names"]),
            train_counts=list(data["train_counts"]),
            declared=bool(data.get("declared", False)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
