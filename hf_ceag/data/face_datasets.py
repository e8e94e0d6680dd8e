"""The paper's datasets as train/test DatasetDicts: UTKFace (a local folder), FairFace (local csv files or the
Hub) and CIFAR-100 (the Hub).

Every loader returns what `load_image_dataset` returns: `train` and `test` splits whose rows give
`pixel_values` (a float tensor `[3, size, size]`, transformed on the fly), `label` (a ClassLabel) and the group
column(s), here ClassLabels too, so reports name the groups.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Sequence

import datasets
from PIL import Image

from .images import ImageTransform

UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")
FAIRFACE_RACES = (
    "White",
    "Black",
    "Latino_Hispanic",
    "East Asian",
    "Southeast Asian",
    "Indian",
    "Middle Eastern",
)
GENDERS = ("Male", "Female")
GROUPINGS = {"race": ("race",), "race_gender": ("race", "gender")}

FAIRFACE_HUB_ID = "HuggingFaceM4/FairFace"
FAIRFACE_CSVS = {"train": "fairface_label_train.csv", "test": "fairface_label_val.csv"}
CIFAR100_HUB_ID = "uoft-cs/cifar100"

# age_gender_race_datetime, then any suffix (the aligned & cropped release appends ".jpg.chip.jpg").
UTKFACE_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)[^/]*\.(jpe?g|png)$", re.IGNORECASE)
UTKFACE_EXAMPLE = "25_1_3_20170104231305129.jpg.chip.jpg"
IMAGE_COLUMN = "image"


def _group_columns(group_by: str) -> tuple[str, ...]:
    if group_by not in GROUPINGS:
        raise ValueError(f"group_by={group_by!r} is not one of {list(GROUPINGS)}.")
    return GROUPINGS[group_by]


def _is_readable(path: str) -> bool:
    # Decode now (at 1/8 scale for JPEGs, so it stays cheap) rather than crash hours into training.
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image.width // 8 or 1, image.height // 8 or 1))
            image.load()
    except (OSError, ValueError, SyntaxError):
        return False
    return True


def _warn_skipped(skipped: list[str], where: str, reason: str) -> None:
    if skipped:
        examples = ", ".join(sorted(skipped)[:5])
        warnings.warn(f"Skipped {len(skipped)} file(s) in {where} ({reason}), e.g. {examples}.", stacklevel=3)


def _features(label_names: Sequence[str], columns: Sequence[str]) -> datasets.Features:
    names = {"race": list(label_names), "gender": list(GENDERS)}
    return datasets.Features(
        {
            IMAGE_COLUMN: datasets.Image(),
            "label": datasets.ClassLabel(names=list(label_names)),
            **{c: datasets.ClassLabel(names=names[c]) for c in columns},
        }
    )


def _finish(data: datasets.DatasetDict, image_column: str, image_size: int) -> datasets.DatasetDict:
    data.set_transform(ImageTransform(image_column, image_size, channels=3))
    return data


def load_utkface(
    folder: str,
    group_by: str = "race",
    image_size: int = 200,
    test_size: float = 0.2,
    seed: int = 0,
) -> datasets.DatasetDict:
    """UTKFace from a local folder of `age_gender_race_datetime.jpg` files (race 0-4 = White, Black, Asian,
    Indian, Others; gender 0 = male, 1 = female), e.g. the aligned & cropped `UTKFace/` release.

    Target: race. Group columns: `race` (`group_by="race"`, 5 groups) or `race` and `gender`
    (`group_by="race_gender"`, 10 intersectional groups). Files whose names do not follow the pattern, or that
    do not decode as images, are skipped with a warning giving their count. UTKFace has no official split: a
    `test_size` split stratified by race is drawn with `seed`.
    """
    columns = _group_columns(group_by)
    if not os.path.isdir(folder):
        raise ValueError(f"UTKFace folder {folder!r} does not exist: pass the folder holding the .jpg files.")
    rows: dict[str, list] = {IMAGE_COLUMN: [], "label": [], "race": [], "gender": []}
    malformed, unreadable = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        match = UTKFACE_NAME.match(name)
        if match is None:
            malformed.append(name)
            continue
        if not _is_readable(path):
            unreadable.append(name)
            continue
        gender, race = int(match.group(2)), int(match.group(3))
        for column, value in ((IMAGE_COLUMN, path), ("label", race), ("race", race), ("gender", gender)):
            rows[column].append(value)
    if not rows[IMAGE_COLUMN]:
        raise ValueError(
            f"No UTKFace image in {folder!r}: expected files named age_gender_race_datetime.jpg, e.g. "
            f"{UTKFACE_EXAMPLE!r} ({len(malformed)} malformed name(s), {len(unreadable)} unreadable image(s))."
        )
    _warn_skipped(malformed, folder, "name not age_gender_race_datetime.jpg")
    _warn_skipped(unreadable, folder, "not a readable image")
    kept = {c: rows[c] for c in (IMAGE_COLUMN, "label", *columns)}
    dataset = datasets.Dataset.from_dict(kept, features=_features(UTKFACE_RACES, columns))
    split = dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    return _finish(
        datasets.DatasetDict({"train": split["train"], "test": split["test"]}), IMAGE_COLUMN, image_size
    )


def _read_fairface_csv(folder: str, file_name: str, columns: Sequence[str]) -> dict[str, list]:
    path = os.path.join(folder, file_name)
    if not os.path.isfile(path):
        raise ValueError(
            f"FairFace folder {folder!r} has no {file_name}: it needs {list(FAIRFACE_CSVS.values())} "
            "(columns file, age, gender, race, service_test) beside the image folders they name."
        )
    rows: dict[str, list] = {IMAGE_COLUMN: [], "label": [], "race": [], "gender": []}
    missing, bad = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            race, gender = row.get("race"), row.get("gender")
            if race not in FAIRFACE_RACES or gender not in GENDERS:
                bad.append(f"{row.get('file')} (race={race!r}, gender={gender!r})")
                continue
            image = os.path.join(folder, row["file"])
            if not os.path.isfile(image):
                missing.append(row["file"])
                continue
            race_id = FAIRFACE_RACES.index(race)
            for column, value in ((IMAGE_COLUMN, image), ("label", race_id), ("race", race_id)):
                rows[column].append(value)
            rows["gender"].append(GENDERS.index(gender))
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} row(s) with an unknown race or gender, e.g. {bad[:3]}. Races must be one of "
            f"{list(FAIRFACE_RACES)}, genders one of {list(GENDERS)}."
        )
    if not rows[IMAGE_COLUMN]:
        raise ValueError(f"{path}: none of its images exist; `file` must be relative to {folder!r}.")
    _warn_skipped(missing, path, "listed in the csv but missing")
    return {c: rows[c] for c in (IMAGE_COLUMN, "label", *columns)}


def _fairface_from_hub(source: str, columns: Sequence[str], hub_config: str) -> datasets.DatasetDict:
    loaded = datasets.load_dataset(source, hub_config)
    splits = {}
    for ours, theirs in (("train", "train"), ("test", "validation")):
        split = loaded[theirs]
        # Ids in our race order, whatever order the Hub's ClassLabel uses.
        for column, names in (("race", FAIRFACE_RACES), ("gender", GENDERS)):
            split = split.align_labels_with_mapping({n: i for i, n in enumerate(names)}, column)
        split = split.add_column("label", list(split.with_format(None)["race"]))
        split = split.select_columns([IMAGE_COLUMN, "label", *columns])
        splits[ours] = split.cast(_features(FAIRFACE_RACES, columns))
    return datasets.DatasetDict(splits)


def load_fairface(
    source: str,
    group_by: str = "race",
    image_size: int = 224,
    hub_config: str = "0.25",
) -> datasets.DatasetDict:
    """FairFace with its own train/validation split (as train/test). Target: race (7: White, Black,
    Latino_Hispanic, East Asian, Southeast Asian, Indian, Middle Eastern); groups `race` or `race` × `gender`.

    `source` is a local folder holding `fairface_label_train.csv` and `fairface_label_val.csv` (columns `file,
    age, gender, race, service_test`; `file` relative to the folder), or a Hub id such as
    `HuggingFaceM4/FairFace` (config `hub_config`: "0.25" or "1.25", the padding around the face). Images
    listed but missing locally are skipped with a warning giving their count.
    """
    columns = _group_columns(group_by)
    if not os.path.isdir(source):
        if "/" not in source:
            raise ValueError(
                f"FairFace source {source!r} is neither a folder nor a Hub id like {FAIRFACE_HUB_ID!r}."
            )
        return _finish(_fairface_from_hub(source, columns, hub_config), IMAGE_COLUMN, image_size)
    features = _features(FAIRFACE_RACES, columns)
    splits = {
        split: datasets.Dataset.from_dict(_read_fairface_csv(source, name, columns), features=features)
        for split, name in FAIRFACE_CSVS.items()
    }
    return _finish(datasets.DatasetDict(splits), IMAGE_COLUMN, image_size)


def load_cifar100(source: str = CIFAR100_HUB_ID, image_size: int = 32) -> datasets.DatasetDict:
    """CIFAR-100 from the Hub (columns `img`, `fine_label`, `coarse_label`): target and group column are both
    the 100 fine classes (`label` and `fine_label`)."""
    loaded = datasets.load_dataset(source)
    splits = {}
    for name in ("train", "test"):
        split = loaded[name].select_columns(["img", "fine_label"])
        feature = split.features["fine_label"]
        split = split.add_column("label", list(split.with_format(None)["fine_label"]), feature=feature)
        splits[name] = split
    return _finish(datasets.DatasetDict(splits), "img", image_size)
