"""The embedded default: "styled digits", a seeded augmentation of scikit-learn's handwritten digits in which
a rare group of images is drawn in another style (contrast-inverted), so that pruning has a real, measurable
disparate impact on the training set.

Why not the raw digits: 1,797 8×8 images are too easy and too few. A dense model fits the training set
exactly, and so does a pruned one once fine-tuning works, so every group's excess accuracy gap is ≈ 0; a group
of 27 training images moves ψ_g by 0.037 per image, more than a tolerance of 0.01 (DESIGN §4).

What this builds, deterministically from `seed` (no network, no files):

* the source images are split train/test first (stratified by digit), so no test row is an augmentation of a
  training image;
* each source image gives `copies` rows, each a random affine warp (rotation ±15°, scale 0.85–1.1, shear,
  shift of ±10 %), a smooth elastic distortion, thicker strokes for 30 % of rows, contrast jitter and pixel
  noise, rendered at `image_size`;
* exactly `round(inverted_fraction · n)` rows of each split, chosen at random, are contrast-inverted (white
  digit strokes become dark strokes on a light background): the `inverted` group; the others are `plain`.

With the defaults (8 copies, 10 % inverted) the training split has 10,776 rows, 1,078 of them inverted, and
the test split 3,600 (360 inverted): one image moves a training group's accuracy by at most 0.001. The
inverted group is rare, and a pruned network spends its remaining capacity on the majority style: that is
the disparate impact CEAG is there to remove.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from .images import DIGITS_MEAN, DIGITS_STD

STYLES = ("plain", "inverted")
STYLED_DIGITS_DATASET = "hf-ceag styled digits"  # `DatasetInfo.dataset_name` of `load_styled_digits_dataset`
_WORK_SIZE = 32  # augmentations are drawn at this resolution, then the images are resized to image_size


def load_styled_digits_dataset(
    image_size: int = 16,
    seed: int = 0,
    copies: int = 8,
    inverted_fraction: float = 0.1,
    test_size: float = 0.25,
) -> datasets.DatasetDict:
    """The embedded default data: `pixel_values` `[1, size, size]` (normalised like the digits), `label`
    (the digit) and `group` (`plain` or `inverted`, a ClassLabel), in `train` and `test` splits.

    Deterministic for a given `seed` (which also sets the train/test split of the source images).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if copies < 1:
        raise ValueError(f"copies={copies} must be >= 1 (augmented rows per source image).")
    if not 0.0 < inverted_fraction < 0.5:
        raise ValueError(
            f"inverted_fraction={inverted_fraction} must lie in (0, 0.5): the inverted style is rare."
        )
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size={test_size} must lie in (0, 1).")
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels
    )
    generator = torch.Generator().manual_seed(seed)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(1, image_size, image_size), dtype="float32"),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
            "group": datasets.ClassLabel(names=list(STYLES)),
        }
    )

    def split(idx: np.ndarray) -> datasets.Dataset:
        source = images[torch.as_tensor(idx)].repeat_interleave(copies, dim=0)
        pixels = augment(source, image_size, generator)
        style = torch.zeros(len(pixels), dtype=torch.long)
        style[torch.randperm(len(pixels), generator=generator)[: round(inverted_fraction * len(pixels))]] = 1
        pixels = torch.where(style.view(-1, 1, 1, 1) == 1, 1.0 - pixels, pixels)
        data = {
            "pixel_values": ((pixels - DIGITS_MEAN) / DIGITS_STD).numpy(),
            "label": np.repeat(labels[idx], copies),
            "group": style.numpy(),
        }
        info = datasets.DatasetInfo(dataset_name=STYLED_DIGITS_DATASET, description=__doc__, features=features)
        return datasets.Dataset.from_dict(data, features=features, info=info).with_format("torch")

    return datasets.DatasetDict({"train": split(train_idx), "test": split(test_idx)})


def augment(images: torch.Tensor, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random affine + elastic warp, stroke thickening, contrast jitter and noise of `[N, 1, h, w]` images in
    [0, 1]; returns `[N, 1, image_size, image_size]` in [0, 1]. Every random draw comes from `generator`."""
    n = len(images)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    work = F.interpolate(images, size=(_WORK_SIZE, _WORK_SIZE), mode="bilinear", align_corners=False)
    angle, scale = uniform(-math.pi / 12, math.pi / 12), uniform(0.85, 1.1)
    shear, shift = uniform(-0.2, 0.2), uniform(-0.1, 0.1, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, shift[:, 0]], 1),
            torch.stack([sin, cos + shear * sin, shift[:, 1]], 1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(work.shape), align_corners=False)
    # Elastic: a random displacement field drawn on a coarse 4×4 grid and smoothly upsampled.
    coarse = uniform(-1.0, 1.0, 2, 4, 4) * 0.08
    grid = grid + F.interpolate(
        coarse, size=(_WORK_SIZE, _WORK_SIZE), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    work = F.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    thick = uniform(0.0, 1.0) < 0.3
    work = torch.where(thick.view(-1, 1, 1, 1), F.max_pool2d(work, 3, stride=1, padding=1), work)
    out = F.interpolate(work, size=(image_size, image_size), mode="area")
    out = out * uniform(0.75, 1.25, 1, 1, 1) + 0.05 * torch.randn(out.shape, generator=generator)
    return out.clamp(0.0, 1.0)
