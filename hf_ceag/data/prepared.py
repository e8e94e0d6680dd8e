"""The datasets of a `CEAGTrainer` run, prepared once when it is built: groups indexed, every split encoded with
group ids, the held-out rows of the dual step split off, and what the audit and the saved folder need to know of
the data (the transform the training rows are audited through, the image processor, the dataset's name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets

from .encoding import dataset_display_name, encode_eval, encode_split, split_for_held_out_duals, warn_small_groups
from .groups import GroupIndex
from .preprocessing import audit_transform, known_image_processor, with_transform_of


@dataclass
class PreparedData:
    """What `CEAGTrainer` trains on and audits.

    `train`: the rows the primal step trains on; `constraint`: the rows held out for the dual step (None without
    `constraint_split`); `eval`: the encoded eval dataset(s); `audit_transform`: the transform the training rows
    are audited through instead of their own (None: their own), with `train_audit_note` saying which; and
    `processing_class`: the user's, or the image processor of data hf-ceag made (None: unknown)."""

    group_index: GroupIndex
    train: datasets.Dataset
    constraint: datasets.Dataset | None
    eval: datasets.Dataset | dict[str, datasets.Dataset] | None
    audit_transform: Any
    train_audit_note: str
    dataset_name: str | None
    processing_class: Any

    @classmethod
    def prepare(cls, config, model, train_dataset, eval_dataset, processing_class) -> PreparedData:
        """Index the groups of `train_dataset` (`config.group_columns`), encode every split, and split off the
        held-out rows; refuses, before any training, the mistakes each step can find."""
        index = GroupIndex.from_dataset(train_dataset, config.group_columns)
        if config.mitigation != "none":  # NFT has no replay buffers
            warn_small_groups(index, config.buffer_size)
        train = encode_split(index, train_dataset, "train")
        evaluation = encode_eval(index, eval_dataset, model)
        transform, note = audit_transform(train, evaluation)
        primal, constraint = split_for_held_out_duals(train, config)
        if processing_class is None:  # so that every saved folder is `pipeline`-ready where it can be
            processing_class = known_image_processor(train_dataset)
        return cls(index, primal, constraint, evaluation, transform, note, dataset_display_name(train_dataset),
                   processing_class)  # fmt: skip

    def audited_training_rows(self) -> dict[str, datasets.Dataset]:
        """`train` and (with held-out duals) `constraint`, read through `audit_transform` where there is one."""
        rows = {"train": self.train, **({"constraint": self.constraint} if self.constraint is not None else {})}
        if self.audit_transform is None:
            return rows
        return {name: with_transform_of(split, self.audit_transform) for name, split in rows.items()}
