"""Batches fetched as columns (data/batches.py) equal the Trainer's: `default_data_collator` over the rows."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import default_data_collator

from hf_ceag import CEAGTrainer
from hf_ceag.data.batches import ColumnBatches, ColumnCollator, collate_columns


def assert_same_batch(columnar, rows):
    assert columnar.keys() == rows.keys()
    for key in rows:
        assert columnar[key].dtype == rows[key].dtype, key
        assert torch.equal(columnar[key], rows[key]), key


def image_rows(n=6):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8), mode="L") for _ in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]})


def to_pixels(batch):  # the common `with_transform` pattern: a list of tensors
    batch["pixel_values"] = [
        torch.as_tensor(np.asarray(im), dtype=torch.float32)[None] for im in batch.pop("image")
    ]
    return batch


DATASETS = {
    "torch format: arrays, class labels, ids": lambda digits: digits["train"],
    "with_transform: a list of tensors": lambda digits: image_rows().with_transform(to_pixels),
    "float labels, a string and a None column": lambda digits: datasets.Dataset.from_dict(
        {
            "x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
            "label": [0.5, 1.5, 2.5],
            "name": ["a", "b", "c"],
            "note": [None, None, None],
        }
    ).with_format("torch"),
    "label_ids lists, python format": lambda digits: datasets.Dataset.from_dict(
        {"x": [1, 2, 3], "label_ids": [[0, 1], [1, 0], [1, 1]]}
    ),
    "numpy format": lambda digits: datasets.Dataset.from_dict(
        {"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "label": [2, 0, 1]}
    ).with_format("numpy"),
}


@pytest.mark.parametrize("kind", list(DATASETS))
def test_columns_collate_to_the_default_collators_batch_of_rows(digits, kind):
    dataset = DATASETS[kind](digits)
    indices = [2, 0, 1] if len(dataset) < 6 else [5, 1, 3, 0]
    rows = default_data_collator([dataset[i] for i in indices])  # the Trainer's path, row by row
    fetched = ColumnBatches(dataset).__getitems__(indices)
    assert_same_batch(ColumnCollator()(fetched), rows)
    assert_same_batch(collate_columns(dataset[indices]), rows)
    # a list of rows (held-out draws, a user's own fetch) still goes to the rows' collator
    assert_same_batch(ColumnCollator()([dataset[i] for i in indices]), rows)


def test_the_trainer_fetches_columns_only_with_the_default_collator(tiny_model, digits, make_config):
    trainer = CEAGTrainer(tiny_model, make_config(), train_dataset=digits["train"])
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.dataset, ColumnBatches)
    encoded = trainer.train_dataset
    torch.manual_seed(0)
    indices = torch.randperm(len(encoded))[:32].tolist()
    assert_same_batch(
        loader.collate_fn(loader.dataset.__getitems__(indices)),
        default_data_collator([encoded[i] for i in indices]),
    )
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "labels", "ceag_group_id"} and len(batch["labels"]) == 32

    def own(rows):
        return default_data_collator(rows)

    mine = CEAGTrainer(tiny_model, make_config(), train_dataset=digits["train"], data_collator=own)
    # a collator of the user's gets rows, as from the Trainer, with the group ids carried around it
    assert mine.data_collator.collator is own and not isinstance(
        mine.get_train_dataloader().dataset, ColumnBatches
    )
