"""Training on a stream (`datasets.IterableDataset`): the same run as on the map-style dataset it streams, and the
mistakes a stream allows refused before training.

The same rows in the same order, from `dataset` read in order (`train_sampling_strategy="sequential"`) and from
`dataset.to_iterable_dataset()`, give bit-identical multipliers, buffers, weights, sparsity, report and evaluation
logs on the CPU, on one process and on two (gloo). On two, the Trainer's eval *loss* alone differs: it averages
per-batch mean losses, and accelerate pads the last eval batch of a map-style set with rows from its start but
splits a dispatched stream's last batch evenly, so the batches averaged differ (every per-row figure agrees).
"""

import json
import os
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import streaming_worker
from test_scale_out import PROCESSES_ON_CPU, run

from hf_ceag.data.streaming import MAP_BATCH

WORKER = str(ROOT / "tests" / "streaming_worker.py")


def same_run(out, rank=0, eval_loss=True):
    """Assert that the map-style and the streamed run of `out` (rank `rank`) agree exactly."""
    tensors = [load_file(os.path.join(out, f"{style}-rank{rank}.safetensors")) for style in ("map", "stream")]
    for name in tensors[0]:
        assert torch.equal(tensors[0][name], tensors[1][name]), name
    figures = []
    for style in ("map", "stream"):
        with open(os.path.join(out, f"{style}-rank{rank}.json")) as f:
            figures.append(json.load(f))
    if not eval_loss:
        for run_figures in figures:
            for log in run_figures["evaluations"]:
                log.pop("eval_test_loss")
    assert figures[0] == figures[1]
    return tensors[0], figures[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Both runs on the CPU: in this process without a GPU, else in one that cannot see it."""
    out = tmp_path_factory.mktemp("stream_one")
    if torch.cuda.is_available():
        run([sys.executable, WORKER, str(out)], ROOT / "tests", cpu_only=True)
    else:
        streaming_worker.main(str(out))
    return out


def test_a_stream_trains_exactly_as_the_dataset_it_streams(one_process):
    tensors, figures = same_run(one_process)
    report = figures["report"]
    # what the stream's dense pass counted is what the table holds, and every row was audited
    data = streaming_worker.load_digits_dataset(image_size=16, rare_groups=(3, 8))
    groups = torch.as_tensor(data["train"].select(range(streaming_worker.TRAIN_ROWS))["group"][:])
    assert figures["train_counts"] == torch.bincount(groups, minlength=10).tolist()
    assert sum(g["n"] for g in report["splits"]["train"]["groups"]) == streaming_worker.TRAIN_ROWS
    assert sum(g["n"] for g in report["splits"]["test"]["groups"]) == streaming_worker.EVAL_ROWS
    assert tensors["multipliers"].max() > 0  # the dual step moved: the comparison covers it
    assert len(figures["evaluations"]) == 2 and abs(figures["sparsity"] - 0.5) < 1e-3


def test_two_processes_train_a_stream_exactly_as_the_dataset_it_streams(tmp_path):
    out = tmp_path / "two"
    out.mkdir()
    run(["torchrun", "--standalone", "--nproc_per_node", "2", WORKER, str(out)], ROOT / "tests", PROCESSES_ON_CPU)
    first, figures = same_run(out, 0, eval_loss=False)
    second, _ = same_run(out, 1, eval_loss=False)
    assert torch.equal(first["multipliers"], second["multipliers"])  # identical on every process
    assert sum(g["n"] for g in figures["report"]["splits"]["test"]["groups"]) == streaming_worker.EVAL_ROWS


# ---- mistakes refused before training ----


PLAIN = datasets.Value("int64")  # a group column that is not a ClassLabel


def digits_stream(digits, rows=64, group_feature=None):
    data = digits["train"].select(range(rows))
    if group_feature is not None:
        data = data.cast_column("group", group_feature)
    return data.to_iterable_dataset()


def stream_config(make_config, **overrides):
    values = {"max_steps": 4, "pruning_end_epoch": None, "pruning_end_step": 2, "eval_strategy": "no"}
    return make_config(**{**values, **overrides})


def test_a_stream_without_max_steps_is_refused_naming_it(digits, tiny_model, make_config):
    from hf_ceag import CEAGTrainer

    with pytest.raises(ValueError, match=r"set max_steps .*--max_steps"):
        CEAGTrainer(tiny_model, stream_config(make_config, max_steps=-1), train_dataset=digits_stream(digits))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pruning_end_step": None, "pruning_end_epoch": 0.5}, r"pruning_end_epoch=0.5: .*pruning_end_step"),
        ({"constraint_split": 0.2}, r"constraint_split=0.2: .*constraint_split=0"),
        ({"group_columns": ["skin"]}, r"\['skin'\] are not in the streamed train dataset .*'pixel_values'"),
    ],
)  # fmt: skip
def test_what_a_stream_cannot_do_is_refused_when_the_trainer_is_built(
    digits, tiny_model, make_config, overrides, message
):
    from hf_ceag import CEAGTrainer

    with pytest.raises(ValueError, match=message):
        CEAGTrainer(tiny_model, stream_config(make_config, **overrides), train_dataset=digits_stream(digits))


def test_undeclared_groups_are_refused(digits, tiny_model, make_config, tmp_path):
    """Groups that are neither ClassLabels nor listed: refused at construction. A row of a group the list lacks,
    far into the stream (after a whole batch of the group-id map): refused when the dense pass reads it, before any
    step, with nothing written."""
    from hf_ceag import CEAGTrainer

    with pytest.raises(ValueError, match=r"not ClassLabel features .*group_names"):
        CEAGTrainer(tiny_model, stream_config(make_config), train_dataset=digits_stream(digits, 64, PLAIN))
    table = digits["train"].cast_column("group", PLAIN)
    declared = table.filter(lambda row: row["group"] != 9)
    late = datasets.concatenate_datasets([declared, declared, table.filter(lambda row: row["group"] == 9)])
    assert 2 * len(declared) > MAP_BATCH  # a whole batch of the stream's group-id map holds declared groups only
    config = stream_config(
        make_config, group_names=[str(d) for d in range(9)], save_strategy="steps", save_steps=1
    )
    trainer = CEAGTrainer(tiny_model, config, train_dataset=late.to_iterable_dataset())
    with pytest.raises(ValueError, match=r"holds group '9' .*not one of the declared groups .*group_names"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not os.path.exists(config.output_dir) or not os.listdir(config.output_dir)


def test_a_declared_group_without_rows_and_labels_outside_the_model_are_refused(digits, tiny_model, make_config):
    from hf_ceag import CEAGTrainer

    config = stream_config(make_config, group_names=[str(d) for d in range(10)] + ["ten"])
    plain = digits_stream(digits, group_feature=PLAIN)
    with pytest.raises(ValueError, match=r"Declared group\(s\) \['ten'\] have no row in the training data"):
        CEAGTrainer(tiny_model, config, train_dataset=plain).train()
    table = digits["train"].select(range(64)).cast_column("label", PLAIN)
    shifted = table.map(lambda row: {"label": row["label"] + 5}).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"label\(s\) \[10, 11, 12, 13, 14\] outside the model's classes"):
        CEAGTrainer(tiny_model, stream_config(make_config), train_dataset=shifted).train()


# ---- the docs' example, as it is ----


@pytest.fixture(scope="module")
def streaming_example(tmp_path_factory):
    """docs/streaming.md's folders: `my_images/{train,test}` (digits as RGB files, a rare `inverted` style, a
    metadata.csv each) and `my-dense-model`, a tiny ResNet trained on the train images by a plain loop and saved
    with its image processor."""
    from test_user_path import tiny_resnet, write_imagefolder
    from transformers import ViTImageProcessor, set_seed

    root = tmp_path_factory.mktemp("streaming_example")
    for split, (plain, inverted, seed) in {"train": (240, 48, 0), "test": (100, 30, 1)}.items():
        (root / "my_images" / split).mkdir(parents=True)
        write_imagefolder(root / "my_images" / split, plain, inverted, seed)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    train = datasets.load_dataset("imagefolder", data_dir=str(root / "my_images"), split="train")
    pixels = processor([image.convert("RGB") for image in train["image"]], return_tensors="pt")["pixel_values"]
    labels = torch.tensor(train["label"][:])
    set_seed(0)
    model = tiny_resnet(10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        for start in range(0, len(labels), 32):
            loss = torch.nn.functional.cross_entropy(
                model(pixel_values=pixels[start : start + 32]).logits, labels[start : start + 32]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.save_pretrained(root / "my-dense-model")
    processor.save_pretrained(root / "my-dense-model")
    return root


def test_the_docs_streaming_example_runs_as_written(streaming_example, monkeypatch):
    import re

    page = (ROOT / "docs" / "streaming.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    monkeypatch.chdir(streaming_example)
    namespace = {}
    exec(compile(code, "docs/streaming.md", "exec"), namespace)  # noqa: S102 (the docs' own snippet)
    report = namespace["trainer"].report
    assert report["group_names"][:2] == ["plain", "inverted"] if "group_names" in report else True
    rows = {split: sum(g["n"] for g in report["splits"][split]["groups"]) for split in ("train", "test")}
    assert rows == {"train": 288, "test": 130}  # every streamed row was audited, once
    inverted = {g["name"]: g["n"] for g in report["splits"]["train"]["groups"]}
    assert inverted == {"plain": 240, "inverted": 48}
    assert report["splits"]["train"]["accuracy_dense"] > 0.5  # a dense model worth pruning
    folder = streaming_example / "sparse-model"
    assert (folder / "model.safetensors").is_file() and (folder / "report.json").is_file()
    shutil.rmtree(folder)
    assert np.isfinite(report["splits"]["test"]["max_excess_gap"])
