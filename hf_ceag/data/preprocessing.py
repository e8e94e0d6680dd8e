"""How a dataset's rows become `pixel_values`, as far as `CEAGTrainer` can know it: the image processor a saved
folder needs so that `pipeline` sees what the model was trained on, and the view of the training rows that the
audit reads (without the training augmentation)."""

from __future__ import annotations

import random
from typing import Any

import datasets
import numpy as np
import torch

from .groups import CarryGroupIds
from .images import DIGITS_DATASET, image_processor
from .styled_digits import STYLED_DIGITS_DATASET


def dataset_transform(dataset: Any) -> Any:
    """The `with_transform` / `set_transform` callable of a `datasets.Dataset`, or None."""
    fmt = getattr(dataset, "format", None) or {}
    return fmt.get("format_kwargs", {}).get("transform") if fmt.get("type") == "custom" else None


def known_image_processor(dataset: Any):
    """The image processor that turns images into this dataset's `pixel_values`, where hf-ceag made them: its
    digits loaders (named in `DatasetInfo.dataset_name`) and `load_image_dataset` (whose transform knows its
    processor). None for any other data: its preprocessing is the user's."""
    transform = dataset_transform(dataset)
    while transform is not None and not hasattr(transform, "image_processor"):
        transform = getattr(transform, "transform", None)  # a transform wrapped by hf-ceag
    if transform is not None:
        return transform.image_processor()
    info = getattr(dataset, "info", None)
    if getattr(info, "dataset_name", None) in (DIGITS_DATASET, STYLED_DIGITS_DATASET):
        shape = getattr((dataset.features or {}).get("pixel_values"), "shape", None)
        if shape and len(shape) == 3 and shape[0] == 1:
            return image_processor(int(shape[-1]), 1, digits=True)
    return None


def with_transform_of(dataset: datasets.Dataset, transform) -> datasets.Dataset:
    """`dataset` (encoded: with group ids) formatted by another `transform`, its format's columns kept."""
    fmt = dataset.format
    carried = transform if isinstance(transform, CarryGroupIds) else CarryGroupIds(transform)
    return dataset.with_transform(carried, columns=fmt["columns"], output_all_columns=fmt["output_all_columns"])


def transform_is_random(dataset: datasets.Dataset, rows: int = 4) -> bool:
    """Whether the dataset's transform gives other `pixel_values` for the same rows twice in a row (a random
    augmentation). The random number generators are left as they were."""
    if dataset_transform(dataset) is None or len(dataset) == 0:
        return False
    indices = list(range(min(rows, len(dataset))))
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        first, second = dataset[indices], dataset[indices]
    random.setstate(states[0])
    np.random.set_state(states[1])
    return not same_values(first, second)


def same_values(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, (torch.Tensor, np.ndarray)):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return a.shape == b.shape and torch.equal(a, b)
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. PIL images: compare their bytes
        return getattr(a, "tobytes", lambda: a)() == getattr(b, "tobytes", lambda: b)()


def audit_transform(train: datasets.Dataset, eval_dataset: Any) -> tuple[Any, str]:
    """The transform that the audit (the dense reference and the train split of the report) reads the training
    rows through, and a sentence saying which it is.

    The training transform when it is deterministic; else the transform of the first evaluation split that has a
    deterministic one (the usual `with_transform` pair: a random crop for training, resize and centre crop for
    evaluation); else the random training transform itself, with a sentence that says its figures are noisy."""
    train_transform = dataset_transform(train)
    if train_transform is None or not transform_is_random(train):
        return None, ""
    splits = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
    for name, split in splits:
        transform = dataset_transform(split)
        if transform is None:
            continue
        try:
            view = with_transform_of(train, transform)
            if not transform_is_random(view):
                return transform, (
                    f"read through the evaluation transform of the {name!r} split, without the training "
                    "transform's random augmentation"
                )
        except Exception:  # noqa: BLE001, S112 (a transform made for other columns: try the next split)
            continue
    return None, (
        "read through the training transform, which is random (the same rows gave other pixel values twice): "
        "train figures are measured on augmented images and move from one pass to the next. Give the eval "
        "dataset a deterministic transform (resize and centre crop) for the audit to use"
    )
