"""`run_ceag.py --streaming true`, offline: an image folder the test generates, read as a stream."""

import json

import numpy as np
import pytest
from PIL import Image

run_ceag = pytest.importorskip("scripts.run_ceag")

CLASSES, GROUPS, PER_CLASS = ("cat", "dog", "owl"), ("light", "dark", "mid"), 40


def write_imagefolder(root):
    """16×16 RGB PNGs in one folder per class (the class learnable from the colour), with a metadata.csv whose
    label and group columns are strings (no ClassLabel: the run declares both)."""
    rng = np.random.default_rng(0)
    rows = ["file_name,label,group"]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            rows.append(f"{name}/{i}.png,{name},{GROUPS[i % len(GROUPS)]}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def flags(images, out, groups=GROUPS, max_steps=("--max_steps", "8")):
    return [
        "--streaming", "true", "--dataset_name", "imagefolder", "--data_dir", str(images),
        "--class_names", *CLASSES, "--group_columns", "group", "--group_names", *groups, *max_steps,
        "--image_size", "16", "--model_name_or_path", "test_resnet", "--allow_weak_dense_model", "true",
        "--per_device_train_batch_size", "16", "--buffer_size", "4", "--methods", "ceag",
        "--output_dir", str(out), "--disable_tqdm", "true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed") / "images"
    write_imagefolder(root)
    return root


@pytest.fixture(scope="module")
def streamed_run(images):
    out = images.parent / "out"
    run_ceag.main(flags(images, out))
    return out


def test_a_streamed_imagefolder_is_pruned_and_every_row_is_read_once(streamed_run):
    folder = streamed_run / "ceag"
    assert all((folder / name).is_file() for name in ("report.json", "README.md", "model.safetensors"))
    splits = json.loads((folder / "report.json").read_text())["splits"]
    counts = {split: {g["name"]: g["n"] for g in splits[split]["groups"]} for split in ("train", "test")}
    assert sum(counts["train"].values()) + sum(counts["test"].values()) == len(CLASSES) * PER_CLASS
    assert sum(counts["test"].values()) == len(CLASSES) * PER_CLASS // 4  # every 4th row (test_size 0.25)
    assert set(counts["test"]) == set(GROUPS)
    dense = json.loads((streamed_run / "dense" / "hf_ceag_dense.json").read_text())
    assert dense["streaming"] is True and dense["max_steps"] == 8


def test_an_undeclared_group_fails_before_the_dense_model_is_trained(images, tmp_path):
    with pytest.raises(ValueError, match="'mid'.*not one of the declared groups"):
        run_ceag.main(flags(images, tmp_path, groups=GROUPS[:2]))
    assert not (tmp_path / "dense").exists()


def test_a_stream_needs_max_steps_and_a_dataset(images, tmp_path):
    with pytest.raises(ValueError, match="--max_steps"):
        run_ceag.main(flags(images, tmp_path, max_steps=()))
    with pytest.raises(ValueError, match="embedded digits"):
        run_ceag.main(["--streaming", "true", "--max_steps", "8", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "dense").exists()
