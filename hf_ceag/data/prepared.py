"""The datasets of a `CEAGTrainer` run, prepared once when it is built: groups indexed, every split encoded with
group ids, the held-out rows of the dual step split off, and what the audit and the saved folder need to know of
the data (the transform the training rows are audited through, the image processor, the dataset's name).

A training set may be a `datasets.Dataset` or a stream (`datasets.IterableDataset`, `data.streaming`): a stream's
groups are declared, not read, and its rows are counted by the dense pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch

from .encoding import (
    check_labels,
    dataset_display_name,
    encode_split,
    split_for_held_out_duals,
    warn_small_groups,
)  # fmt: skip
from .groups import GROUP_ID_COLUMN, GroupIndex
from .preprocessing import audit_transform, known_image_processor, with_transform_of
from .streaming import check_streamed_split, column_names, encode_stream, is_streamed, stream_audit_note


@dataclass
class PreparedData:
    """What `CEAGTrainer` trains on and audits.

    `train`: the rows the primal step trains on; `constraint`: the rows held out for the dual step (None without
    `constraint_split`); `eval`: the encoded eval dataset(s); `audit_transform`: the transform the training rows
    are audited through instead of their own (None: their own), with `train_audit_note` saying which; and
    `processing_class`: the user's, or the image processor of data hf-ceag made (None: unknown)."""

    group_index: GroupIndex
    train: datasets.Dataset | datasets.IterableDataset
    constraint: datasets.Dataset | None
    eval: Any
    audit_transform: Any
    train_audit_note: str
    dataset_name: str | None
    processing_class: Any

    @classmethod
    def prepare(cls, config, model, train_dataset, eval_dataset, processing_class) -> PreparedData:
        """Index the groups of `train_dataset` (`config.group_columns`; declared by `config.group_names` or, for a
        stream, by its `ClassLabel` features), encode every split, and split off the held-out rows; refuses, before
        any training, the mistakes each step can find."""
        streamed = is_streamed(train_dataset)
        if streamed:  # a missing column is named before the groups are looked for in it
            check_streamed_split(train_dataset, tuple(config.group_columns), "train")
        if streamed or config.group_names:
            index = GroupIndex.declared_groups(train_dataset.features, config.group_columns, config.group_names)
        else:
            index = GroupIndex.from_dataset(train_dataset, config.group_columns)
        if streamed:
            train = encode_stream(index, train_dataset, "train")
        else:
            train = encode_split(index, train_dataset, "train")
            if index.declared:
                count_declared_groups(index, train)
        if config.mitigation != "none" and not streamed:  # NFT has no replay buffers; a stream's: after its pass
            warn_small_groups(index, config.buffer_size)
        evaluation = encode_eval(index, eval_dataset, model)
        transform, note = (None, stream_audit_note(train)) if streamed else audit_transform(train, evaluation)
        primal, constraint = split_for_held_out_duals(train, config)
        if processing_class is None:  # so that every saved folder is `pipeline`-ready where it can be
            processing_class = known_image_processor(train_dataset)
        return cls(index, primal, constraint, evaluation, transform, note, dataset_display_name(train_dataset),
                   processing_class)  # fmt: skip

    @property
    def train_rows(self) -> int | None:
        """Rows of the training set the primal step trains on; None for a stream (no length)."""
        return None if is_streamed(self.train) else len(self.train)

    def audited_training_rows(self) -> dict[str, Any]:
        """`train` and (with held-out duals) `constraint`, read through `audit_transform` where there is one."""
        rows = {"train": self.train, **({"constraint": self.constraint} if self.constraint is not None else {})}
        if self.audit_transform is None:
            return rows
        return {name: with_transform_of(split, self.audit_transform) for name, split in rows.items()}

    def encoded(self, dataset: Any, split: str) -> Any:
        """A dataset given to `evaluate()` later, with group ids (unchanged if it has them, or is a split's name)."""
        if isinstance(dataset, datasets.Dataset) and GROUP_ID_COLUMN not in dataset.column_names:
            return encode_split(self.group_index, dataset, split)
        if is_streamed(dataset) and GROUP_ID_COLUMN not in column_names(dataset):
            return encode_stream(self.group_index, dataset, split)
        return dataset


def named_splits(eval_dataset: Any) -> dict[str, Any]:
    """The eval dataset(s) of a trainer by name: a dict as it is, a single one as "eval", none as {}."""
    if eval_dataset is None:
        return {}
    return dict(eval_dataset) if isinstance(eval_dataset, dict) else {"eval": eval_dataset}


def encode_eval(index: GroupIndex, eval_dataset: Any, model) -> Any:
    """`encode_split` (a stream: `encode_stream`) for one eval dataset or a dict of named ones, each checked like
    the training data."""
    if eval_dataset is None:
        return None
    encoded = {}
    for name, dataset in named_splits(eval_dataset).items():
        if is_streamed(dataset):
            encoded[name] = encode_stream(index, dataset, name)
            continue
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"eval_dataset {name!r} must be a datasets.Dataset or datasets.IterableDataset with the group "
                f"column(s); got {type(dataset).__name__}."
            )
        check_labels(dataset, model, name)
        encoded[name] = encode_split(index, dataset, name)
    return encoded if isinstance(eval_dataset, dict) else encoded["eval"]


def count_declared_groups(
    index: GroupIndex, train: datasets.Dataset | None, counts: list[int] | None = None
) -> None:
    """Set the training counts of a declared index from the encoded training rows (or from `counts`, a stream's
    dense pass); refuses a declared group without a training row: it could be neither estimated nor
    constrained."""
    if counts is None:
        ids = torch.as_tensor(train.with_format(None)[GROUP_ID_COLUMN], dtype=torch.long)
        counts = torch.bincount(ids, minlength=index.num_groups).tolist()
    empty = [name for name, n in zip(index.names, counts) if n == 0]
    if empty:
        raise ValueError(
            f"Declared group(s) {empty} have no row in the training data: a group without training rows cannot be "
            "constrained. Drop them from group_names (or the group column's ClassLabel names), or add their rows."
        )
    index.train_counts = list(counts)
