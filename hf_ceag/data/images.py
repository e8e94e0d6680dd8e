"""Datasets with group columns: the embedded digits default, and user image data (Hub id, imagefolder, parquet,
csv), held whole or streamed.

Every loader returns a `DatasetDict` (streamed: an `IterableDatasetDict`) with `train` and `test` splits whose rows
give `pixel_values` (a float tensor `[channels, size, size]`), `label`, and the group column(s).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from .groups import GroupIndex, check_group_columns

DIGITS_MEAN, DIGITS_STD = 0.3, 0.4  # approximate moments of load_digits pixels scaled to [0, 1]
DIGITS_DATASET = "scikit-learn digits"  # `DatasetInfo.dataset_name` of `load_digits_dataset`
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_digits_dataset(
    image_size: int = 32,
    test_size: float = 0.25,
    seed: int = 0,
    rare_groups: Sequence[int] = (),
    rare_fraction: float = 0.2,
) -> datasets.DatasetDict:
    """scikit-learn's 1,797 handwritten 8×8 digits as a DatasetDict: `pixel_values` `[1, size, size]`
    (bilinear upsampling, normalised), `label` and `group` (both the digit, as ClassLabels).

    The train/test split is stratified by digit with a fixed seed. `rare_groups` keeps only `rare_fraction`
    of those digits' training rows (the imbalanced variant; the test split is untouched).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < rare_fraction <= 1.0:
        raise ValueError(f"rare_fraction={rare_fraction} must lie in (0, 1].")
    bad = [g for g in rare_groups if g not in range(10)]
    if bad:
        raise ValueError(f"rare_groups={list(rare_groups)}: {bad} are not digits 0-9.")
    digits = load_digits()
    images = digits_pixel_values(digits.images, image_size).numpy()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels
    )
    if rare_groups:
        rng = np.random.default_rng(seed)
        keep = []
        for digit in range(10):
            rows = train_idx[labels[train_idx] == digit]
            if digit in rare_groups:
                rows = rng.choice(rows, size=max(1, round(rare_fraction * len(rows))), replace=False)
            keep.append(rows)
        train_idx = np.sort(np.concatenate(keep))
    names = [str(d) for d in range(10)]
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(1, image_size, image_size), dtype="float32"),
            "label": datasets.ClassLabel(names=names),
            "group": datasets.ClassLabel(names=names),
        }
    )

    def split(idx: np.ndarray) -> datasets.Dataset:
        data = {"pixel_values": images[idx], "label": labels[idx], "group": labels[idx]}
        info = datasets.DatasetInfo(
            dataset_name=DIGITS_DATASET, description="scikit-learn's load_digits", features=features
        )
        return datasets.Dataset.from_dict(data, features=features, info=info).with_format("torch")

    return datasets.DatasetDict({"train": split(train_idx), "test": split(test_idx)})


def check_label_column(dataset: datasets.Dataset, column: str, split: str) -> None:
    """Raise a ValueError naming the column, its type and the fix unless it holds integer class ids."""
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return
    dtype = str(getattr(feature, "dtype", type(feature).__name__))
    if dtype.startswith(("int", "uint")):
        return
    example = next(iter(dataset.with_format(None).select_columns([column]).take(1)), {}).get(column)
    raise ValueError(
        f"The {split} dataset's label column {column!r} holds {dtype} values (e.g. {example!r}), not class ids: "
        "the classifier needs integers 0..num_labels-1. Encode class names with "
        f"dataset.class_encode_column({column!r}) (a ClassLabel, which also names the classes), or cast whole-number "
        f"values with dataset.cast_column({column!r}, datasets.Value('int64'))."
    )


def check_images(dataset: datasets.Dataset, image_column: str, split: str) -> None:
    """Open every image of an `Image` column (header and, for PNG, the chunk checksums; no decoding) and raise a
    ValueError naming the files that are not readable images, instead of a crash in the middle of training."""
    if not isinstance(dataset.features.get(image_column), datasets.Image):
        return
    from PIL import Image

    raw = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    bad = []
    for batch in raw.with_format(None).iter(batch_size=256):
        for item in batch[image_column]:
            source = io.BytesIO(item["bytes"]) if item.get("bytes") else item.get("path")
            try:
                with Image.open(source) as image:
                    image.verify()
            except (OSError, ValueError, SyntaxError) as error:
                bad.append(f"{item.get('path') or '<embedded bytes>'} ({type(error).__name__}: {error})")
    if bad:
        raise ValueError(
            f"{len(bad)} image(s) of the {split} split cannot be read: {'; '.join(bad[:5])}. Replace or delete those "
            "files (and their metadata rows), or drop their rows, e.g. with dataset.filter(...), and run again."
        )


class _KeepColumns:
    # A dataset transform followed by dropping the keys the model does not take (picklable for worker processes).
    def __init__(self, transform, keep: Sequence[str]) -> None:
        self.transform, self.keep = transform, set(keep)

    def __call__(self, batch: dict) -> dict:
        return {k: v for k, v in self.transform(batch).items() if k in self.keep}


def keep_columns_after_transform(dataset: datasets.Dataset, keep: Sequence[str]) -> datasets.Dataset | None:
    """For a dataset with a `with_transform` / `set_transform` (the common pattern: an `image` column that the
    transform turns into `pixel_values`), the same dataset whose transform output keeps only `keep`: the columns
    the transform reads stay in the dataset. None for a dataset without a transform."""
    current = dataset.format
    if current["type"] != "custom":
        return None
    transform = _KeepColumns(current["format_kwargs"]["transform"], keep)
    return dataset.with_transform(
        transform, columns=current["columns"], output_all_columns=current["output_all_columns"]
    )


def digits_pixel_values(images: np.ndarray, image_size: int) -> torch.Tensor:
    """`pixel_values` `[n, 1, size, size]` of scikit-learn digit images `[n, 8, 8]` (values 0-16): scaled to
    [0, 1], upsampled (bilinear), normalised with the digits' moments."""
    pixels = torch.tensor(np.asarray(images), dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (pixels - DIGITS_MEAN) / DIGITS_STD


class ImageTransform:
    """The dataset transform of `load_image_dataset`: each image (converted to RGB, or to grayscale for 1 channel)
    resized to `image_size` (bilinear, as a PIL image: as timm's eval transform and transformers' image processors
    resize), scaled to [0, 1] and normalised. `image_processor()` is the same preprocessing as a transformers image
    processor, saved beside the model so that `pipeline` sees exactly the pixel values the model was trained on."""

    def __init__(self, image_column: str, image_size: int, channels: int) -> None:
        from torchvision.transforms import v2

        self.image_column, self.image_size, self.channels = image_column, image_size, channels
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
        self.pipeline = v2.Compose(
            [
                v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BILINEAR),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )

    def __call__(self, batch: dict) -> dict:
        mode = "RGB" if self.channels == 3 else "L"
        batch["pixel_values"] = [self.pipeline(image.convert(mode)) for image in batch.pop(self.image_column)]
        return batch

    def image_processor(self):
        return image_processor(self.image_size, self.channels)


def load_image_dataset(
    dataset_name: str,
    group_columns: Sequence[str],
    image_column: str = "image",
    label_column: str = "label",
    data_dir: str | None = None,
    image_size: int = 32,
    channels: int = 3,
    test_size: float = 0.2,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Load user image data with group columns and transform images on the fly to `pixel_values`.

    `dataset_name` is a Hub id, `imagefolder` (with `data_dir`; labels from the sub-folder names, or with
    group columns, from its metadata.csv beside `file_name`), `parquet` (with `data_dir`), a .parquet file, or a
    path to a csv file with an image-path column (paths relative to the csv). Without a `test` split, a
    split stratified by the first group column is made with a fixed seed.
    """
    if dataset_name.endswith(".csv"):
        if not os.path.isfile(dataset_name):
            raise ValueError(f"dataset_name={dataset_name!r}: no such csv file.")
        loaded = datasets.load_dataset("csv", data_files={"train": dataset_name})
        root = os.path.dirname(os.path.abspath(dataset_name))
        loaded = loaded.map(lambda row: {image_column: os.path.join(root, row[image_column])})
        loaded = loaded.cast_column(image_column, datasets.Image())
    else:
        loaded = open_image_data(dataset_name, data_dir)
    for split in loaded.values():
        needed = [image_column, label_column, *group_columns]
        missing = [c for c in needed if c not in split.column_names]
        if missing:
            raise ValueError(
                f"Column(s) {missing} not in dataset {dataset_name!r}; available: {split.column_names}. "
                "Set --image_column, --label_column and --group_columns to the dataset's names."
            )
    for name, split in loaded.items():  # a corrupt file fails here, named, not as a traceback deep in training
        check_images(split, image_column, name)
    if label_column != "label":
        loaded = loaded.rename_column(label_column, "label")
    label_feature = loaded["train"].features["label"]
    if not isinstance(label_feature, datasets.ClassLabel) and not str(label_feature.dtype).startswith("int"):
        loaded = loaded.class_encode_column("label")  # class names (strings, bools) → ClassLabel ids
    if "test" not in loaded:
        train = loaded["train"]
        from sklearn.model_selection import train_test_split

        check_group_columns(train, group_columns, "train")  # NaN groups would become a group of their own
        # Stratified by the first group column, whatever its type (strings included), so that every group
        # keeps its share in both splits.
        groups = train.with_format(None)[group_columns[0]]
        train_idx, test_idx = train_test_split(
            np.arange(len(train)), test_size=test_size, random_state=seed, stratify=groups
        )
        loaded = {"train": train.select(np.sort(train_idx)), "test": train.select(np.sort(test_idx))}
    loaded = datasets.DatasetDict({"train": loaded["train"], "test": loaded["test"]})
    loaded.set_transform(ImageTransform(image_column, image_size, channels))
    return loaded


STREAM_CHECKED_ROWS = 1000  # rows of a stream whose labels and groups are checked before any training


def open_image_data(dataset_name: str, data_dir: str | None = None, streaming: bool = False):
    """`datasets.load_dataset` of a Hub id, `imagefolder` or `parquet` (with `data_dir`), or a .parquet file (its
    rows: the `train` split), held whole or streamed."""
    if dataset_name in ("imagefolder", "parquet") and not data_dir:
        raise ValueError(f"dataset_name={dataset_name!r} needs --data_dir pointing at the folder of the data.")
    if dataset_name.endswith(".parquet"):
        if not os.path.isfile(dataset_name):
            raise ValueError(f"dataset_name={dataset_name!r}: no such parquet file.")
        return datasets.load_dataset("parquet", data_files={"train": dataset_name}, streaming=streaming)
    return datasets.load_dataset(dataset_name, data_dir=data_dir, streaming=streaming)


def load_streamed_image_dataset(
    dataset_name: str,
    group_columns: Sequence[str],
    image_column: str = "image",
    label_column: str = "label",
    data_dir: str | None = None,
    image_size: int = 32,
    channels: int = 3,
    test_size: float = 0.2,
    class_names: Sequence[str] | None = None,
    group_names: Sequence[str] | None = None,
) -> datasets.IterableDatasetDict:
    """`load_image_dataset` as a stream (`load_dataset(..., streaming=True)`): nothing is downloaded or held whole.

    `dataset_name`: a Hub id, `imagefolder` or `parquet` (with `data_dir`), or a .parquet file. Each split keeps
    `label` and the group columns, with their features, and gets `pixel_values` lazily (`ImageTransform`, in a
    batched `map`). The labels must be a `ClassLabel` (the model's classes are known before the stream is read),
    or `class_names` names the classes in id order (a column of names or of ids is cast to that ClassLabel). The
    groups are declared: the group columns' `ClassLabel` names, or `group_names` (`GroupIndex.declared_groups`).
    The test split is the stream's `test` (else `validation`) split; without one, row i is a test row when
    i % k == 0, k = round(1 / test_size), so that an ordered stream (an imagefolder is read class by class) has
    every class in both splits. The first `STREAM_CHECKED_ROWS` rows of each split are read, their labels and
    groups only, so that an unknown class or group fails here rather than during training (a later row fails
    when it is read).
    """
    if dataset_name.endswith(".csv"):
        raise ValueError(
            f"dataset_name={dataset_name!r}: a csv of image paths is read whole; load it without streaming, or "
            "stream an imagefolder or parquet files."
        )
    loaded = open_image_data(dataset_name, data_dir, streaming=True)
    if "train" not in loaded:
        raise ValueError(f"dataset {dataset_name!r} has no train split; its splits: {list(loaded)}.")
    held_out = next((name for name in ("test", "validation") if name in loaded), None)
    splits = {"train": loaded["train"], **({"test": loaded[held_out]} if held_out else {})}
    splits = {name: _with_class_labels(split, dataset_name, image_column, label_column, group_columns, class_names)
              for name, split in splits.items()}  # fmt: skip
    index = GroupIndex.declared_groups(splits["train"].features, group_columns, group_names)
    for name, split in splits.items():
        _check_first_rows(split, index, name)
    if held_out is None:
        every = max(2, round(1 / test_size))
        train = splits["train"]
        splits = {
            "train": train.filter(_EveryKth(every, keep=False), with_indices=True),
            "test": train.filter(_EveryKth(every, keep=True), with_indices=True),
        }
    transform = ImageTransform(image_column, image_size, channels)
    return datasets.IterableDatasetDict(
        {name: _stream_pixel_values(split, transform) for name, split in splits.items()}
    )


def _with_class_labels(
    split: datasets.IterableDataset,
    dataset_name: str,
    image_column: str,
    label_column: str,
    group_columns: Sequence[str],
    class_names: Sequence[str] | None,
) -> datasets.IterableDataset:
    # the columns the run reads, the labels renamed to `label` and made a ClassLabel (or refused)
    features = split.features
    available = list(features or {})
    missing = [c for c in (image_column, label_column, *group_columns) if c not in available]
    if missing:
        raise ValueError(
            f"Column(s) {missing} not in the streamed dataset {dataset_name!r}; available: {available}. Set "
            "--image_column, --label_column and --group_columns to the dataset's names."
        )
    split = split.select_columns([image_column, label_column, *group_columns])
    if label_column != "label":
        split = split.rename_column(label_column, "label")
    if class_names:
        return split.cast_column("label", datasets.ClassLabel(names=list(class_names)))
    if isinstance(split.features["label"], datasets.ClassLabel):
        return split
    raise ValueError(
        f"The streamed label column {label_column!r} is {split.features['label']}, not a ClassLabel, so the number "
        "of classes is unknown before the stream is read. Name the classes in id order: --class_names a b ... "
        f"(class_names=[...]), or give the column a ClassLabel, e.g. dataset.cast_column({label_column!r}, "
        "datasets.ClassLabel(names=[...]))."
    )


def _check_first_rows(split: datasets.IterableDataset, index: GroupIndex, name: str) -> None:
    # labels and groups only (no image is decoded): casting a label to its ClassLabel refuses an unknown class
    columns = ["label", *index.columns]
    features = [split.features[c] for c in index.columns]
    try:
        for row in split.select_columns(columns).take(STREAM_CHECKED_ROWS):
            index.group_id(tuple(row[c] for c in index.columns), features, name)
    except ValueError as error:
        if "class label" not in str(error).lower():  # datasets' words for a label its ClassLabel lacks
            raise
        raise ValueError(
            f"The {name} data holds a label that its classes {split.features['label'].names} do not name ({error}): "
            "add it to --class_names (class_names=[...], in id order), or drop those rows (dataset.filter(...))."
        ) from error


class _EveryKth:
    # `filter(..., with_indices=True)`: row i is kept when (i % k == 0) == keep (picklable for worker processes)
    def __init__(self, k: int, keep: bool) -> None:
        self.k, self.keep = k, keep

    def __call__(self, _row: dict, index: int) -> bool:
        return (index % self.k == 0) == self.keep


def _stream_pixel_values(split: datasets.IterableDataset, transform: ImageTransform) -> datasets.IterableDataset:
    # the images become pixel_values as rows are read; the label and group features are kept (the trainer reads
    # a stream's groups from its features)
    size = transform.image_size
    features = datasets.Features({k: v for k, v in split.features.items() if k != transform.image_column})
    features["pixel_values"] = datasets.Array3D(shape=(transform.channels, size, size), dtype="float32")
    mapped = split.map(
        _AsArrays(transform), batched=True, remove_columns=[transform.image_column], features=features
    )
    return mapped.with_format("torch")


class _AsArrays:
    # a stream's formatter makes each value a tensor again: given tensors, torch warns at every batch
    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        batch = self.transform(batch)
        batch["pixel_values"] = [pixels.numpy() for pixels in batch["pixel_values"]]
        return batch


def image_processor(image_size: int, channels: int, digits: bool = False):
    """An image processor matching this module's transforms, saved beside the model so that users can feed
    it images: resize to `image_size`, rescale to [0, 1], normalise (digits: grayscale, their moments)."""
    from transformers import ViTImageProcessor

    if digits:
        mean, std = [DIGITS_MEAN], [DIGITS_STD]
    else:
        mean, std = (list(IMAGENET_MEAN), list(IMAGENET_STD)) if channels == 3 else ([0.5], [0.5])
    return ViTImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, image_mean=mean, image_std=std
    )
