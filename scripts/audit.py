#!/usr/bin/env python
"""Audit a pruned model against its dense parent, group by group, without training.

Takes a dense model folder, a sparse model folder (pruned by any tool) and a dataset with group columns
(the same data arguments as run_ceag.py), and writes report.json, excess_gaps.png and a model card
README.md into --output_dir:

    python scripts/audit.py --dense_model outputs/ceag-digits/dense --sparse_model outputs/ceag-digits/ceag \
        --output_dir outputs/audit
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

import datasets
import huggingface_hub
import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_ceag import DataArguments, load_data, reproduce_command

from hf_ceag import GroupIndex, format_report, prunable_parameters
from hf_ceag.audit.model_card import build_model_card, model_card_details, write_model_folder_extras
from hf_ceag.audit.report import build_report, save_report, split_report
from hf_ceag.ceag_config import has_accelerator
from hf_ceag.data.groups import GROUP_ID_COLUMN
from hf_ceag.models.classifiers import load_classifier
from hf_ceag.pruning.magnitude import measured_sparsity, sparsity_definition


@dataclass
class AuditArguments:
    """The two models to compare and how to judge them."""

    dense_model: str = field(metadata={"help": "Folder (or Hub id) of the dense model."})
    sparse_model: str = field(metadata={"help": "Folder (or Hub id) of the pruned model, pruned by any tool."})
    output_dir: str = field(default="outputs/audit", metadata={"help": "Where report, plot and card go."})
    group_columns: list[str] = field(default_factory=lambda: ["group"], metadata={"help": "Group column(s)."})
    tolerance: float = field(default=0.01, metadata={"help": "ε: largest acceptable excess accuracy gap."})
    method_name: str = field(default="audit", metadata={"help": "Name of the pruning method, for the report."})
    batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    seed: int = field(default=0, metadata={"help": "Seed of the data split and of the bootstrap."})

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError(f"--tolerance={self.tolerance} is negative: give a fraction >= 0, e.g. 0.01.")


def load_model(path: str, role: str):
    """One model; refused when its saved weights do not fill its architecture, since it would then be audited
    with re-initialised weights."""
    check_model_path(path, role)
    model, info = load_classifier(path, output_loading_info=True)
    missing, unexpected = list(info.get("missing_keys", [])), list(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        pruned = [k for k in unexpected if k.endswith(("weight_orig", "weight_mask"))]
        hint = (
            " Its weights were saved from torch.nn.utils.prune without removing the re-parametrisation: call "
            "torch.nn.utils.prune.remove(module, 'weight') on every pruned module, then save_pretrained again."
            if pruned
            else " Save the model with save_pretrained from the model it was trained as."
        )
        raise ValueError(
            f"--{role}_model {path}: its saved weights do not match its architecture ({len(missing)} missing, "
            f"e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(mismatched)} of another "
            f"shape): it would be audited with re-initialised weights.{hint}"
        )
    return model


def check_model_path(path: str, role: str) -> None:
    """Refuse, before any data is loaded, a model path that is neither a saved folder nor (online) a Hub id."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"--{role}_model {path}: the folder has no config.json, so it is not a save_pretrained folder. "
                "Pass the folder the model was saved into (model.save_pretrained(folder))."
            )
        return
    try:
        validate_repo_id(path)
        hub_id = not os.path.isabs(path) and not path.startswith(".")
    except HFValidationError:
        hub_id = False
    if not hub_id or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"--{role}_model {path}: folder not found (from {os.getcwd()})"
            + ("" if not hub_id else ", and the Hub is not reachable offline (HF_HUB_OFFLINE)")
            + f". Pass the {role} model's save_pretrained folder"
            + (", e.g. OUTPUT_DIR/dense of scripts/run_ceag.py." if role == "dense" else ", e.g. OUTPUT_DIR/ceag.")
        )


def saved_image_size(path: str) -> int | None:
    """The image size a saved folder's image processor resizes to (None if unknown)."""
    config = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        size = json.load(f).get("size")
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    return int(size) if isinstance(size, (int, float)) else None


def check_same_architecture(dense, sparse, audit: AuditArguments) -> None:
    """Refuse a dense model that is not the sparse model's architecture (names and shapes of every weight)."""
    dense_shapes = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    sparse_shapes = {k: tuple(v.shape) for k, v in sparse.state_dict().items()}
    if dense_shapes != sparse_shapes:
        only = sorted(set(dense_shapes) ^ set(sparse_shapes))[:3]
        shapes = [f"{k}: {dense_shapes[k]} vs {sparse_shapes[k]}" for k in dense_shapes.keys() & sparse_shapes.keys()
                  if dense_shapes[k] != sparse_shapes[k]][:3]  # fmt: skip
        raise ValueError(
            f"--dense_model {audit.dense_model} is not the architecture of --sparse_model {audit.sparse_model} "
            f"({type(dense).__name__} vs {type(sparse).__name__}; weights in one only, e.g. {only}; other "
            f"shapes, e.g. {shapes}). Audit a model against the dense model it was pruned from."
        )


def check_image_size(audit: AuditArguments, script: DataArguments) -> None:
    """Refuse an --image_size the models were not trained at (when their folders record one)."""
    for role, path in (("dense", audit.dense_model), ("sparse", audit.sparse_model)):
        trained = saved_image_size(path)
        if trained is not None and trained != script.image_size:
            raise ValueError(
                f"--image_size {script.image_size}, but the {role} model was trained at {trained} px (its "
                f"preprocessor_config.json): pass --image_size {trained}."
            )


def load_models(audit: AuditArguments):
    """Both models, with a clear error when their label sets or architectures differ."""
    dense = load_model(audit.dense_model, "dense")
    sparse = load_model(audit.sparse_model, "sparse")
    dense_labels, sparse_labels = dense.config.id2label, sparse.config.id2label
    if dense.config.num_labels != sparse.config.num_labels or dense_labels != sparse_labels:
        raise ValueError(
            f"The dense model ({audit.dense_model}) and the sparse model ({audit.sparse_model}) have different "
            f"label sets: {dense.config.num_labels} classes {list(dense_labels.values())[:10]} vs "
            f"{sparse.config.num_labels} classes {list(sparse_labels.values())[:10]}. Audit a model against "
            "the dense model it was pruned from."
        )
    check_same_architecture(dense, sparse, audit)
    return dense, sparse


def check_input_size(model, name: str, dataset: datasets.Dataset) -> None:
    """Run one row through `model`; a clear error when the data's image size does not fit it."""
    pixel_values = dataset[0]["pixel_values"]
    pixel_values = torch.as_tensor(pixel_values).unsqueeze(0)
    try:
        with torch.no_grad():
            model.eval()(pixel_values=pixel_values.float())
    except (RuntimeError, ValueError) as error:
        expected = getattr(model.config, "image_size", None)
        raise ValueError(
            f"The {name} model cannot take the data's images of shape {tuple(pixel_values.shape[1:])}"
            + (f" (its config expects image_size={expected})" if expected else "")
            + ": set --image_size (and channels) to what the models were trained on."
            + f" ({type(error).__name__}: {str(error)[:200]})"
        ) from error


def correct_predictions(model, dataset: datasets.Dataset, audit: AuditArguments) -> torch.Tensor:
    """Per-row correctness of `model` on `dataset`, in row order (Trainer.predict: any device, any launcher)."""
    rows = dataset.remove_columns(
        [c for c in audit.group_columns + [GROUP_ID_COLUMN] if c in dataset.column_names]
    )
    with tempfile.TemporaryDirectory() as scratch:  # predict saves nothing, but the Trainer wants a folder
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=audit.batch_size,
            remove_unused_columns=False,
            report_to="none",
            disable_tqdm=False,
            dataloader_pin_memory=has_accelerator(),  # nothing to pin for on a CPU machine (and no warning per pass)
        )
        output = Trainer(model=model, args=args).predict(rows)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return torch.as_tensor(logits).argmax(-1) == torch.as_tensor(output.label_ids)


def audit_models(audit: AuditArguments, script: DataArguments, config) -> dict:
    check_image_size(audit, script)
    dense, sparse = load_models(audit)
    data, _ = load_data(script, config)
    index = GroupIndex.from_dataset(data["train"], audit.group_columns)
    splits = {name: index.encode(data[name], name) for name in ("train", "test")}
    check_input_size(dense, "dense", splits["train"])
    check_input_size(sparse, "sparse", splits["train"])
    reports = {}
    for name, dataset in splits.items():
        groups = torch.tensor(dataset.with_format(None)[GROUP_ID_COLUMN])
        reports[name] = split_report(
            groups,
            correct_predictions(dense, dataset, audit),
            correct_predictions(sparse, dataset, audit),
            index.names,
            audit.tolerance,
            num_constrained_groups=index.num_groups,
            seed=audit.seed,
        )
    # the trainer's definition (the layers it prunes by default), so that the audit and the card agree
    pruned_layers = prunable_parameters(sparse, keep_first_last_dense=True)
    sparsity, per_layer = measured_sparsity(pruned_layers)
    report = build_report(
        method=audit.method_name,
        tolerance=audit.tolerance,
        target_sparsity=None,
        sparsity=sparsity,
        splits=reports,
        audited_model=audit.sparse_model,
        dense_model=audit.dense_model,
        group_columns=list(index.columns),
        sparsity_definition=sparsity_definition(True, len(pruned_layers)),
        sparsity_all_conv_linear=measured_sparsity(prunable_parameters(sparse, keep_first_last_dense=False))[0],
        layer_sparsity=per_layer,
    )
    architecture = getattr(sparse.config, "architecture", None)
    card = build_model_card(
        report,
        model_name=os.path.basename(os.path.abspath(audit.sparse_model)),
        repo_or_path=audit.sparse_model,
        training={
            "pruning": "unknown (audited after pruning by another tool)",
            "group_columns": list(index.columns),
        },
        base_model=audit.dense_model,
        dataset_name=script.dataset_name,
        command=reproduce_command(sys.argv),
        timm_architecture=architecture if isinstance(architecture, str) else None,
        **model_card_details(sparse, audit.sparse_model, pruned_layers),
    )
    save_report(report, audit.output_dir)
    write_model_folder_extras(report, card, audit.output_dir)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((AuditArguments, DataArguments))
    audit, script = parser.parse_args_into_dataclasses(args=argv)
    if script.streaming:
        raise ValueError(
            "--streaming: the audit reads every row of each split (its bootstrap intervals need them all); run it "
            "without --streaming, on the same data held whole."
        )
    config = _DataConfig(group_columns=audit.group_columns, seed=audit.seed)
    report = audit_models(audit, script, config)
    print(format_report(report))
    print(f"Report, plot and card written to {audit.output_dir}")
    return report


@dataclass
class _DataConfig:
    # The two fields of CEAGConfig that load_data reads.
    group_columns: list[str]
    seed: int


if __name__ == "__main__":
    main()
