#!/usr/bin/env python
"""Audit a pruned model against its dense parent, group by group, without training.

Takes a dense model folder, a sparse model folder (pruned by any tool) and a dataset with group columns
(the same data arguments as run_ceag.py), and writes report.json, excess_gaps.png and a model card
README.md into --output_dir:

    python scripts/audit.py --dense_model outputs/ceag-digits/dense --sparse_model outputs/ceag-digits/ceag \
        --output_dir outputs/audit
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
from transformers import AutoModelForImageClassification, HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_ceag import DataArguments, load_data, reproduce_command  # noqa: E402

from hf_ceag import GroupIndex, format_report, prunable_parameters  # noqa: E402
from hf_ceag.groups import GROUP_ID_COLUMN  # noqa: E402
from hf_ceag.model_card import build_model_card, write_model_folder_extras  # noqa: E402
from hf_ceag.report import build_report, save_report, split_report  # noqa: E402


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


def load_models(audit: AuditArguments):
    """Both models, with a clear error when their label sets differ."""
    dense = AutoModelForImageClassification.from_pretrained(audit.dense_model, use_safetensors=True)
    sparse = AutoModelForImageClassification.from_pretrained(audit.sparse_model, use_safetensors=True)
    dense_labels, sparse_labels = dense.config.id2label, sparse.config.id2label
    if dense.config.num_labels != sparse.config.num_labels or dense_labels != sparse_labels:
        raise ValueError(
            f"The dense model ({audit.dense_model}) and the sparse model ({audit.sparse_model}) have different "
            f"label sets: {dense.config.num_labels} classes {list(dense_labels.values())[:10]} vs "
            f"{sparse.config.num_labels} classes {list(sparse_labels.values())[:10]}. Audit a model against "
            "the dense model it was pruned from."
        )
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
    args = TrainingArguments(
        output_dir=os.path.join(audit.output_dir, "_predict"),
        per_device_eval_batch_size=audit.batch_size,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=False,
    )
    rows = dataset.remove_columns(
        [c for c in audit.group_columns + [GROUP_ID_COLUMN] if c in dataset.column_names]
    )
    output = Trainer(model=model, args=args).predict(rows)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return torch.as_tensor(logits).argmax(-1) == torch.as_tensor(output.label_ids)


def layer_sparsity(model) -> tuple[float, dict[str, float]]:
    """Fraction of zeros over all conv/linear weights, and per layer."""
    weights = prunable_parameters(model, keep_first_last_dense=False)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    return zeros / total, {name: float((w == 0).float().mean()) for name, w in weights.items()}


def audit_models(audit: AuditArguments, script: DataArguments, config) -> dict:
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
    sparsity, per_layer = layer_sparsity(sparse)
    report = build_report(
        method=audit.method_name,
        tolerance=audit.tolerance,
        target_sparsity=None,
        sparsity=sparsity,
        splits=reports,
        audited_model=audit.sparse_model,
        dense_model=audit.dense_model,
        group_columns=list(index.columns),
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
    )
    save_report(report, audit.output_dir)
    write_model_folder_extras(report, card, audit.output_dir)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((AuditArguments, DataArguments))
    audit, script = parser.parse_args_into_dataclasses(args=argv)
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
