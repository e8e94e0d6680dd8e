"""Real-data path of run_ceag.py, offline: an image folder and a csv of image paths the test generates."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hf_ceag import load_image_dataset
from hf_ceag.audit.report import finite_or_none

run_ceag = pytest.importorskip("scripts.run_ceag")


def make_images(root, n=48):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = ["cat", "dog", "owl"][i % 3]
        tone = ["light", "dark"][(i // 3) % 2]
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        pixels[..., i % 3] = 255  # the class is learnable from the colour
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{label}/{i}.png", "tone": tone, "label_name": label})
    return rows


def test_imagefolder_end_to_end_through_the_cli(tmp_path, check_pipeline):
    rows = make_images(tmp_path / "images")
    with open(tmp_path / "images" / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "tone", "label_name"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    reports = run_ceag.main(
        [
            "--dataset_name",
            "imagefolder",
            "--data_dir",
            str(tmp_path / "images"),
            "--group_columns",
            "tone",
            "--label_column",
            "label_name",
            "--model_name_or_path",
            "test_resnet",
            "--image_size",
            "16",
            "--dense_epochs",
            "1",
            "--allow_weak_dense_model",
            "true",
            "--num_train_epochs",
            "2",
            "--pruning_end_epoch",
            "1",
            "--buffer_size",
            "4",
            "--methods",
            "ceag",
            "--output_dir",
            str(out),
            "--disable_tqdm",
            "true",
        ]
    )
    report = json.loads((out / "ceag" / "report.json").read_text())
    assert report == json.loads(json.dumps(finite_or_none(reports["ceag"])))  # NaN saved as null
    assert {g["name"] for g in report["splits"]["train"]["groups"]} == {"light", "dark"}
    assert sum(g["n"] for g in report["splits"]["test"]["groups"]) == report["splits"]["test"]["n"]
    assert (out / "dense" / "model.safetensors").exists() and (out / "ceag" / "model.safetensors").exists()
    card = (out / "ceag" / "README.md").read_text()  # named by the folder's name, never another dataset's
    assert "on `imagefolder images`" in card and "digits" not in card.lower() and str(tmp_path) not in card

    # both folders work with transformers' pipeline on the images themselves, with the pixel values (and so the
    # predictions) the model was trained and evaluated on; it used to resize them to timm's default 160 px
    data = load_image_dataset(
        "imagefolder", ["tone"], label_column="label_name", data_dir=str(tmp_path / "images"), image_size=16
    )
    pixel_values = torch.stack([row["pixel_values"] for row in data["test"]])
    images = data["test"].with_format(None)["image"]
    for name in ("dense", "ceag"):
        check_pipeline(out / name, images, pixel_values)


def test_csv_of_image_paths_and_missing_columns(tmp_path):
    rows = make_images(tmp_path / "images", n=12)
    with open(tmp_path / "images" / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "species", "tone"])
        writer.writeheader()
        writer.writerows(
            {"path": r["file_name"], "species": "cat" in r["file_name"], "tone": r["tone"]} for r in rows
        )
    data = load_image_dataset(
        str(tmp_path / "images" / "labels.csv"),
        ["tone"],
        image_column="path",
        label_column="species",
        image_size=8,
        test_size=0.25,
    )
    row = data["train"][0]
    assert tuple(row["pixel_values"].shape) == (3, 8, 8) and row["tone"] in ("light", "dark")
    assert len(data["train"]) + len(data["test"]) == 12
    with pytest.raises(ValueError, match=r"\['skin'\] not in dataset .* --group_columns"):
        load_image_dataset(
            str(tmp_path / "images" / "labels.csv"), ["skin"], image_column="path", label_column="species"
        )


def test_the_common_image_column_and_with_transform_pattern_trains_as_it_is(tiny_model, make_config):
    """An `image` column turned into `pixel_values` by `dataset.with_transform(...)`: the Trainer's default
    `remove_unused_columns=True` used to drop `image` before the transform ran (`KeyError: 'image'`). Unused
    columns are now dropped from the transform's output instead."""
    import datasets

    from hf_ceag import CEAGTrainer

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 64)
    images = [Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)) for _ in labels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10), "tone": datasets.Value("string")}
    )
    data = datasets.Dataset.from_dict(
        {"image": images, "label": labels.tolist(), "tone": ["light", "dark"] * 32}, features=features
    )

    def transform(batch):
        batch["pixel_values"] = [torch.tensor(np.asarray(i.resize((16, 16))), dtype=torch.float32)[None] / 255
                                 for i in batch["image"]]  # fmt: skip
        return batch

    data = data.with_transform(transform)
    config = make_config(mitigation="ceag", group_columns=["tone"], max_steps=4, pruning_end_epoch=0.1)
    assert config.remove_unused_columns  # the Trainer's default
    trainer = CEAGTrainer(tiny_model, config, train_dataset=data, eval_dataset={"test": data})
    trainer.train()
    assert trainer.state.global_step == 4
    assert trainer.group_report()["splits"]["test"]["n"] == 64
    assert "eval_test_max_excess_gap" in trainer.evaluate()
