"""The embedded default data: big enough groups, deterministic per seed, the rare style really inverted."""

import numpy as np
import pytest
import torch

from hf_ceag import load_styled_digits_dataset
from hf_ceag.data.images import DIGITS_MEAN, DIGITS_STD


@pytest.fixture(scope="module")
def styled():
    return load_styled_digits_dataset(image_size=16, seed=0)


def test_every_training_group_is_large_and_the_inverted_style_is_rare(styled):
    train, test = styled["train"], styled["test"]
    assert train.features["group"].names == ["plain", "inverted"]
    assert len(train) >= 10_000
    counts = np.bincount(train.with_format(None)["group"], minlength=2)
    assert counts.min() >= 200  # one image is at most 0.005 of a group's accuracy
    assert counts[1] == round(0.1 * len(train))
    assert np.bincount(test.with_format(None)["group"], minlength=2)[1] == round(0.1 * len(test))
    assert sorted(set(train.with_format(None)["label"])) == list(range(10))
    assert tuple(train[0]["pixel_values"].shape) == (1, 16, 16)


def test_inverted_rows_are_contrast_inverted_digits(styled):
    train = styled["train"]
    pixels = train[:]["pixel_values"] * DIGITS_STD + DIGITS_MEAN  # back to [0, 1]
    groups = train[:]["group"]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # digits are light strokes on a dark background: a plain image's border is dark, an inverted one's light
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0], pixels[..., :, -1]], -1)
    border = border.mean(dim=(1, 2))
    assert (border[groups == 0] < 0.5).all()
    assert (border[groups == 1] > 0.5).all()


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data(styled):
    again = load_styled_digits_dataset(image_size=16, seed=0)
    other = load_styled_digits_dataset(image_size=16, seed=1)
    assert torch.equal(styled["train"][:]["pixel_values"], again["train"][:]["pixel_values"])
    assert torch.equal(styled["test"][:]["group"], again["test"][:]["group"])
    assert not torch.equal(styled["train"][:100]["pixel_values"], other["train"][:100]["pixel_values"])


def test_bad_arguments_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="inverted_fraction"):
        load_styled_digits_dataset(inverted_fraction=0.7)
    with pytest.raises(ValueError, match="copies"):
        load_styled_digits_dataset(copies=0)
