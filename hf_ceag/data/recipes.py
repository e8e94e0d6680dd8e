"""The paper's three settings by name, for `scripts/run_ceag.py` and the yaml files in `configs/`.

`--dataset_name utkface` (with `--data_dir`), `fairface` (with `--data_dir`, or without it from the Hub),
`HuggingFaceM4/FairFace` and `uoft-cs/cifar100` load through the loaders in `face_datasets`; the group columns
named in the config pick the grouping (`race`, or `race` and `gender`; `fine_label` for CIFAR-100). The
CIFAR-100 recipe's `cifar_resnet56` is registered with timm by `hf_ceag.register_timm_models()` (which
`build_classifier` calls).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets

from .face_datasets import (
    CIFAR100_HUB_ID,
    FAIRFACE_CSVS,
    FAIRFACE_HUB_ID,
    GROUPINGS,
    load_cifar100,
    load_fairface,
    load_utkface,
)

RECIPE_DATASETS = ("utkface", "fairface", FAIRFACE_HUB_ID, CIFAR100_HUB_ID)


def _face_grouping(dataset_name: str, group_columns: Sequence[str]) -> str:
    for group_by, columns in GROUPINGS.items():
        if tuple(group_columns) == columns:
            return group_by
    raise ValueError(
        f"group_columns={list(group_columns)} is not a grouping of {dataset_name}: use "
        + " or ".join(str(list(c)) for c in GROUPINGS.values())
        + "."
    )


def load_recipe_data(
    dataset_name: str | None,
    data_dir: str | None,
    group_columns: Sequence[str],
    image_size: int,
    test_size: float,
    seed: int,
) -> datasets.DatasetDict | None:
    """The train/test DatasetDict of a paper setting, or None when `dataset_name` is not one of
    `RECIPE_DATASETS` (then the generic `load_image_dataset` applies)."""
    if dataset_name not in RECIPE_DATASETS:
        return None
    if dataset_name == CIFAR100_HUB_ID:
        if list(group_columns) != ["fine_label"]:
            raise ValueError(
                f"group_columns={list(group_columns)}: the CIFAR-100 recipe groups by class, use ['fine_label']."
            )
        return load_cifar100(CIFAR100_HUB_ID, image_size=image_size)
    group_by = _face_grouping(dataset_name, group_columns)
    if dataset_name == "utkface":
        if not data_dir:
            raise ValueError("dataset_name='utkface' needs --data_dir: the folder of UTKFace .jpg files.")
        return load_utkface(data_dir, group_by=group_by, image_size=image_size, test_size=test_size, seed=seed)
    if dataset_name == "fairface" and data_dir and not os.path.isdir(data_dir):
        raise ValueError(
            f"--data_dir {data_dir}: folder not found (from {os.getcwd()}). Put the FairFace data there: "
            f"{', '.join(FAIRFACE_CSVS.values())} and the unpacked fairface-img-margin025-trainval.zip (its train/ "
            "and val/ folders); configs/README.md says where to get them. Or pass --data_dir with the folder that "
            f"holds them, or leave data_dir out to load {FAIRFACE_HUB_ID} from the Hub."
        )
    source = data_dir if dataset_name == "fairface" and data_dir else FAIRFACE_HUB_ID
    return load_fairface(source, group_by=group_by, image_size=image_size)
