"""The path a user takes with their own model and data: transformers' official image-classification example
(`run_image_classification.py`) with `Trainer` / `TrainingArguments` swapped for `CEAGTrainer` / `CEAGConfig`, on a
generated `imagefolder` with a rare style group. Its pattern: `set_transform` with a random augmentation for
training and a resize + centre crop for evaluation, a `collate_fn` that builds only `pixel_values` and `labels`,
the dense folder's image processor passed as `processing_class`, `compute_metrics` of the user's.

What must hold: training runs (the group ids survive the collator); the train split is audited without the random
augmentation (checked against a plain loop over the rows); no group is missing from the headline; the card names
the dataset the run used; `pipeline` on the saved folder gives the model's own predictions."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 16


def write_imagefolder(root, plain=300, inverted=94, seed=0):
    """Digits as 16×16 RGB PNG files with a `metadata.csv` (file_name, label, style): `plain` light-on-dark
    images and a rare `inverted` group (dark on light)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    rows = ["file_name,label,style"]
    picks = rng.choice(len(digits.target), size=plain + inverted, replace=False)
    for i, index in enumerate(picks):
        grey = Image.fromarray(np.round(digits.images[index] * 255 / 16).astype(np.uint8), mode="L")
        grey = grey.resize((SIZE, SIZE), Image.BILINEAR)
        style = "inverted" if i >= plain else "plain"
        if style == "inverted":
            grey = Image.fromarray(255 - np.asarray(grey))
        grey.convert("RGB").save(root / f"{i}.png")
        rows.append(f"{i}.png,{digits.target[index]},{style}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def tiny_resnet(num_labels):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=num_labels, id2label={i: str(i) for i in range(num_labels)},
        label2id={str(i): i for i in range(num_labels)},
    )  # fmt: skip
    return ResNetForImageClassification(config)


def example_transforms(image_processor):
    """The official example's transforms, from the dense folder's image processor."""
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        Normalize,
        RandomHorizontalFlip,
        RandomResizedCrop,
        Resize,
        ToTensor,
    )  # fmt: skip

    size = (image_processor.size["height"], image_processor.size["width"])
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
    val = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])
    return train, val


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    """A dense model trained with the plain Trainer on the imagefolder, saved with its image processor."""
    from transformers import Trainer, TrainingArguments, ViTImageProcessor, set_seed

    root = tmp_path_factory.mktemp("user_path")
    (root / "images").mkdir()
    write_imagefolder(root / "images")
    processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    data = datasets.load_dataset("imagefolder", data_dir=str(root / "images"))["train"]
    _, val = example_transforms(processor)

    def transform(batch):
        batch["pixel_values"] = [val(image.convert("RGB")) for image in batch["image"]]
        return batch

    set_seed(0)
    model = tiny_resnet(10)
    args = TrainingArguments(
        output_dir=str(root / "dense_run"), num_train_epochs=30, learning_rate=0.05, optim="sgd",
        optim_args="momentum=0.9", per_device_train_batch_size=32, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, save_strategy="no", lr_scheduler_type="cosine",
    )  # fmt: skip

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["label"] for r in rows])}  # fmt: skip

    trainer = Trainer(model=model, args=args, train_dataset=data.with_transform(transform), data_collator=collate,
                      processing_class=processor)  # fmt: skip
    trainer.train()
    trainer.save_model(str(root / "dense"))
    return root


def test_the_official_example_pattern_with_ceag_trainer(dense_folder, check_pipeline):
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, AutoModelForImageClassification, set_seed

    from hf_ceag import CEAGConfig, CEAGTrainer

    root = dense_folder
    # --- the example, as a user adapts it ---
    dataset = datasets.load_dataset("imagefolder", data_dir=str(root / "images"))
    split = dataset["train"].train_test_split(0.2, seed=0)
    dataset["train"], dataset["validation"] = split["train"], split["test"]
    image_processor = AutoImageProcessor.from_pretrained(str(root / "dense"))
    model = AutoModelForImageClassification.from_pretrained(str(root / "dense"))
    train_aug, val = example_transforms(image_processor)

    def train_transforms(example_batch):
        example_batch["pixel_values"] = [train_aug(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    def val_transforms(example_batch):
        example_batch["pixel_values"] = [val(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    dataset["train"].set_transform(train_transforms)
    dataset["validation"].set_transform(val_transforms)

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example["label"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    def compute_metrics(p):
        return {"my_accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    set_seed(0)
    args = CEAGConfig(
        output_dir=str(root / "sparse"), group_columns=["style"], remove_unused_columns=False, max_steps=24,
        pruning_end_epoch=0.5, target_sparsity=0.5, buffer_size=8, learning_rate=0.01, optim="sgd",
        per_device_train_batch_size=32, save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    trainer = CEAGTrainer(
        model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset["validation"],
        compute_metrics=compute_metrics, processing_class=image_processor, data_collator=collate_fn,
    )  # fmt: skip
    trainer.train()  # used to stop: "the training batch has no 'ceag_group_id' column", after the dense pass
    trainer.save_model()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    folder = root / "sparse"
    report = json.loads((folder / "report.json").read_text())

    # --- the train split was audited through the validation transform, not the random crops ---
    assert "evaluation transform of the 'eval' split" in report["train_audit"]
    assert "without the training transform's random augmentation" in report["split_rows"]["train"]
    dense = AutoModelForImageClassification.from_pretrained(str(root / "dense")).eval()
    rows = split["train"]
    with torch.no_grad():
        pixels = torch.stack([val(image.convert("RGB")) for image in rows["image"]])
        correct = (dense(pixel_values=pixels).logits.argmax(-1) == torch.tensor(rows["label"])).double()
    assert report["splits"]["train"]["accuracy_dense"] == pytest.approx(float(correct.mean()), abs=1.5 / len(rows))
    styles = np.array(rows["style"])
    for group in report["splits"]["train"]["groups"]:
        naive = float(correct[torch.as_tensor(styles == group["name"])].mean())
        assert group["accuracy_dense"] == pytest.approx(naive, abs=1.5 / group["n"]), group["name"]

    # --- no group is missing from the headline: logged metrics, report.json and the card agree ---
    evaluation = report["splits"]["eval"]
    inverted = next(g for g in evaluation["groups"] if g["name"] == "inverted")
    assert inverted["n"] < evaluation["min_samples"] and inverted["status"] == "too few samples"
    headline = max(g["excess_gap"] for g in evaluation["groups"])
    assert evaluation["max_excess_gap"] == pytest.approx(headline, abs=1e-12)
    assert metrics["eval_max_excess_gap"] == pytest.approx(headline, abs=1e-9)
    worst = max(evaluation["groups"], key=lambda g: g["excess_gap"])
    assert evaluation["max_excess_gap_group"] == worst["name"]
    card = ModelCard.load(folder / "README.md")
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results["max excess accuracy gap (eval)"].metric_value == pytest.approx(headline, abs=1e-6)
    assert f"max excess gap {headline:+.4f} ({worst['name']}" in card.text

    # --- the card names the data this run used, never another dataset ---
    assert "scikit-learn" not in card.content and "digits" not in card.content.lower()
    assert {r.dataset_name for r in card.data.eval_results} == {"imagefolder"}
    assert "on `imagefolder`" in card.text

    # --- pipeline on the saved folder gives the model's own predictions ---
    paths = [str(root / "images" / name) for name in sorted(p.name for p in (root / "images").glob("*.png"))[:40]]
    pixel_values = torch.stack([val(Image.open(p).convert("RGB")) for p in paths])
    check_pipeline(folder, paths, pixel_values, atol=1e-4)


def test_a_collator_or_transform_that_drops_the_labels_fails_before_the_dense_pass(dense_folder, monkeypatch):
    from transformers import AutoModelForImageClassification

    from hf_ceag import CEAGConfig, CEAGTrainer

    root = dense_folder
    data = datasets.load_dataset("imagefolder", data_dir=str(root / "images"))["train"]
    data.set_transform(lambda b: {"pixel_values": [torch.zeros(3, SIZE, SIZE) for _ in b["image"]]})
    model = AutoModelForImageClassification.from_pretrained(str(root / "dense"))
    args = CEAGConfig(
        output_dir=str(root / "dropped"), group_columns=["style"], remove_unused_columns=False, max_steps=4,
        pruning_end_epoch=0.01, report_to="none", disable_tqdm=True,
    )  # fmt: skip
    trainer = CEAGTrainer(model=model, args=args, train_dataset=data)
    monkeypatch.setattr(trainer, "_compute_dense_statistics", lambda: pytest.fail("the dense pass started"))
    with pytest.raises(ValueError, match="has no labels .*'pixel_values', 'ceag_group_id'"):
        trainer.train()


def test_choosing_the_checkpoint_on_the_users_validation_split(dense_folder, check_pipeline):
    """The same example with `load_best_model_at_end` on a group metric of the user's validation split, a test
    split evaluated alongside: the loaded checkpoint is the best one at the final sparsity, the folder loads in
    `pipeline`, and the card says which checkpoint it is."""
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, AutoModelForImageClassification, set_seed

    from hf_ceag import CEAGConfig, CEAGTrainer

    root = dense_folder
    data = datasets.load_dataset("imagefolder", data_dir=str(root / "images"))["train"]
    data = data.class_encode_column("style")
    first = data.train_test_split(0.2, seed=0, stratify_by_column="style")
    second = first["train"].train_test_split(0.25, seed=0, stratify_by_column="style")
    train, validation, test = second["train"], second["test"], first["test"]
    image_processor = AutoImageProcessor.from_pretrained(str(root / "dense"))
    model = AutoModelForImageClassification.from_pretrained(str(root / "dense"))
    _, val = example_transforms(image_processor)

    def transform(batch):
        batch["pixel_values"] = [val(image.convert("RGB")) for image in batch["image"]]
        return batch

    for split in (train, validation, test):
        split.set_transform(transform)

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["label"] for e in examples])}  # fmt: skip

    set_seed(0)
    folder = root / "chosen"
    args = CEAGConfig(
        output_dir=str(folder), group_columns=["style"], remove_unused_columns=False, max_steps=24,
        pruning_end_step=10, target_sparsity=0.5, buffer_size=8, learning_rate=0.01, optim="sgd",
        per_device_train_batch_size=32, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
        load_best_model_at_end=True, metric_for_best_model="validation_max_excess_gap", greater_is_better=False,
        report_to="none", disable_tqdm=True,
    )  # fmt: skip
    trainer = CEAGTrainer(
        model=model, args=args, train_dataset=train, eval_dataset={"validation": validation, "test": test},
        processing_class=image_processor, data_collator=collate_fn,
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    end = trainer.schedule.end
    evals = {h["step"]: h for h in trainer.state.log_history if "eval_validation_max_excess_gap" in h}
    assert min(evals) < end  # checkpoints from before the final sparsity existed, and were passed over
    allowed = [
        s for s, h in evals.items() if s >= end and h["eval_validation_accuracy_drop"] <= args.max_accuracy_drop
    ]
    expected = min(allowed, key=lambda s: (evals[s]["eval_validation_max_excess_gap"], s))
    report = json.loads((folder / "report.json").read_text())
    assert (
        report["selected_checkpoint"]["step"] == expected
        and report["selected_checkpoint"]["split"] == "validation"
    )
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["splits"]["validation"]["max_excess_gap"] == pytest.approx(
        evals[expected]["eval_validation_max_excess_gap"], abs=1e-9
    )
    card = ModelCard.load(folder / "README.md")
    assert f"| selected checkpoint | checkpoint-{expected} (step {expected} of 24)" in card.text
    assert "chosen for its eval_validation_max_excess_gap on these rows" in card.text
    paths = [str(root / "images" / name) for name in sorted(p.name for p in (root / "images").glob("*.png"))[:20]]
    pixel_values = torch.stack([val(Image.open(p).convert("RGB")) for p in paths])
    check_pipeline(folder, paths, pixel_values, atol=1e-4)
