"""A dataset as `CEAGTrainer` sees it: labels checked, group columns replaced by one integer id column."""

from __future__ import annotations

import warnings

import datasets
import torch

from .groups import GroupIndex
from .images import check_label_column

LABEL_COLUMNS = ("label", "labels")


def check_trainer_inputs(config, model, train_dataset, config_class: type) -> None:
    """Refuse, before anything else, a `CEAGTrainer` without a `CEAGConfig`, a model or a `datasets.Dataset` (or
    `datasets.IterableDataset`) to train on; then the training labels (`check_labels`), or what a stream needs
    (`check_stream_run`)."""
    if not isinstance(config, config_class):
        raise TypeError(f"CEAGTrainer: args must be a {config_class.__name__}, got {type(config).__name__}.")
    if model is None:
        raise ValueError("CEAGTrainer: pass the dense model as `model` (model_init is not supported).")
    if isinstance(train_dataset, datasets.IterableDataset):
        check_stream_run(config)
        return
    if not isinstance(train_dataset, datasets.Dataset):
        raise TypeError(
            "CEAGTrainer: train_dataset must be a datasets.Dataset (or a streamed datasets.IterableDataset) holding "
            f"the group column(s) {config.group_columns}; got {type(train_dataset).__name__}."
        )
    check_labels(train_dataset, model, "train")


def check_stream_run(config) -> None:
    """Refuse, before any row is read, a run on a stream that needs a length or a whole table: no `max_steps`,
    a pruning schedule in epochs, held-out duals or FairGRAPE."""
    fix = "or pass a map-style datasets.Dataset (load_dataset without streaming=True)"
    if config.max_steps <= 0:
        raise ValueError(
            "CEAGTrainer: train_dataset is a stream (datasets.IterableDataset), which has no length, so the run "
            "cannot know when an epoch ends: set max_steps (CEAGConfig(max_steps=...), --max_steps N), the number "
            "of optimizer steps to train; the pruning schedule is then in steps too (pruning_end_step)."
        )
    epochs = [f for f in ("pruning_start_epoch", "pruning_end_epoch") if getattr(config, f) not in (None, 0.0)]
    if epochs:
        raise ValueError(
            f"{', '.join(f'{f}={getattr(config, f)}' for f in epochs)}: a stream has no length, so a schedule in "
            "epochs cannot be resolved. Give it in optimizer steps: pruning_start_step and pruning_end_step "
            f"(--pruning_end_step N; default: half of max_steps), {fix}."
        )
    if config.constraint_split > 0 and config.mitigation != "none":
        raise ValueError(
            f"constraint_split={config.constraint_split}: holding training rows out for the dual step needs the "
            f"whole table, which a stream does not give. Set constraint_split=0, {fix}."
        )
    if config.pruning_method == "fairgrape":
        raise ValueError(
            "pruning_method='fairgrape' is not supported on a stream (its rounds are placed in epochs and score "
            f"calibration batches of a table). Use pruning_method='magnitude', {fix}."
        )


def split_for_held_out_duals(train: datasets.Dataset, config) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(the rows the primal step trains on, the held-out rows of the dual step or None) for `config`'s
    `constraint_split` (`hold_out_rows`); NFT has no dual step, so it keeps every row (with a warning)."""
    if config.constraint_split > 0 and config.mitigation == "none":
        warnings.warn(
            f"constraint_split={config.constraint_split} is ignored with mitigation='none': NFT has no dual "
            "step to feed, so it trains on every training row.",
            stacklevel=3,
        )
    if config.constraint_split <= 0 or config.mitigation == "none":
        return train, None
    return hold_out_rows(train, config.constraint_split, config.seed)


def encode_split(index: GroupIndex, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    """Add the group id column and drop the raw group columns: only the ids are needed from here on, and every
    extra column costs time in the datasets formatter on each batch."""
    encoded = index.encode(dataset, split)
    raw = [c for c in index.columns if c in encoded.column_names and c not in LABEL_COLUMNS]
    return encoded.remove_columns(raw) if raw else encoded


def check_labels(dataset: datasets.Dataset, model, split: str) -> None:
    """Refuse, before any training, a split without a label column, with labels of the wrong type, or with labels
    outside the model's classes."""
    column = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    if column is None:
        raise ValueError(
            f"The {split} dataset has no label column (expected one of {LABEL_COLUMNS}); columns: "
            f"{dataset.column_names}. Rename yours, e.g. dataset.rename_column('<yours>', 'label')."
        )
    check_label_column(dataset, column, split)
    check_label_values(torch.as_tensor(dataset.with_format(None)[column]), model, split, column)


def check_label_values(values: torch.Tensor, model, split: str, column: str = "label") -> None:
    """Refuse labels outside the model's classes (a stream's, once its dense pass has read them)."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is None:
        return
    if values.numel() and (values.min() < 0 or values.max() >= num_labels):
        bad = values[(values < 0) | (values >= num_labels)].unique().tolist()[:10]
        raise ValueError(
            f"{split} column {column!r} holds label(s) {bad} outside the model's classes 0..{num_labels - 1}: "
            "build the model with num_labels covering every class, or map the labels to 0..num_labels-1."
        )


def warn_small_groups(index: GroupIndex, buffer_size: int) -> None:
    """Warn about groups smaller than one replay buffer."""
    # Buffers carry over between epochs, so a small group's buffer does fill, after buffer_size / n epochs;
    # but it then holds some images twice, and its estimate reacts to the model more slowly.
    small = [f"{name} (n={n})" for name, n in zip(index.names, index.train_counts) if n < buffer_size]
    if small:
        warnings.warn(
            f"Group(s) {small} have fewer training samples than buffer_size={buffer_size}: their buffers fill "
            "only after more than one epoch and then repeat images, so their constraints start late and react "
            "slowly. Consider a smaller buffer_size or merging groups.",
            stacklevel=3,
        )


def hold_out_rows(
    dataset: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split an encoded training set into (primal rows, held-out rows), stratified by group (`stratified_rows`)."""
    from .groups import GROUP_ID_COLUMN

    ids = torch.as_tensor(dataset.with_format(None)[GROUP_ID_COLUMN], dtype=torch.long)
    kept, held = stratified_rows(ids, fraction, seed, "constraint_split", "the primal step or the dual step")
    return dataset.select(kept), dataset.select(held)


def validation_rows(
    dataset: datasets.Dataset, group_columns: list[str], fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a training set into (training rows, validation rows), stratified by group (`GroupIndex`'s groups of the
    `group_columns`: `stratified_rows`)."""
    from .groups import GROUP_ID_COLUMN, GroupIndex

    encoded = GroupIndex.from_dataset(dataset, group_columns).encode(dataset, "train")
    ids = torch.as_tensor(encoded.with_format(None)[GROUP_ID_COLUMN], dtype=torch.long)
    kept, held = stratified_rows(ids, fraction, seed, "validation_split", "training or validation")
    return dataset.select(kept), dataset.select(held)


def stratified_rows(ids: torch.Tensor, fraction: float, seed: int, field: str, sides: str) -> tuple[list, list]:
    """The row numbers (kept, held out) of a split that holds out round(fraction · n_g) of each group's rows
    (`ids`: a group id per row), chosen by a permutation seeded with `seed`; both lists in row order. Refused
    (naming `field`) when a group would have no row on either side (`sides` says which)."""
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    held = []
    for group in ids.unique().tolist():  # once, before training
        rows = order[ids[order] == group]
        k = round(fraction * rows.numel())
        if not 0 < k < rows.numel():
            raise ValueError(
                f"{field}={fraction}: group id {group} has {rows.numel()} training rows, so {k} would be "
                f"held out and {sides} would see none of it. Use a split fraction that leaves rows on both sides, "
                "or merge small groups."
            )
        held.append(rows[:k])
    held_rows = torch.cat(held).sort().values
    kept = torch.ones(len(ids), dtype=torch.bool)
    kept[held_rows] = False
    return kept.nonzero().flatten().tolist(), held_rows.tolist()


PACKAGED_BUILDERS = ("imagefolder", "csv", "json", "parquet", "arrow", "text", "webdataset", "generator")


def dataset_display_name(dataset: datasets.Dataset) -> str | None:
    """The dataset's own name, as the model card states it: `DatasetInfo.dataset_name` (a Hub dataset's name,
    or hf-ceag's loaders'), else the builder (and its config) that loaded it, e.g. "imagefolder"; None for an
    unnamed in-memory dataset. Never a name the data does not carry."""
    info = dataset.info
    if info.dataset_name and info.dataset_name not in PACKAGED_BUILDERS:
        return info.dataset_name
    if info.builder_name:
        config = f" ({info.config_name})" if info.config_name and info.config_name != "default" else ""
        return f"{info.builder_name}{config}"
    return None
