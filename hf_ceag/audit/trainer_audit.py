"""The audit of a `CEAGTrainer` run: its `report.json` (every audited split, the pruned model against the dense
model's predictions recorded before training), its model card, and the gate on publishing it."""

from __future__ import annotations

import warnings
from typing import Any

import datasets
import torch
from transformers import EvalPrediction

from ..constraints.reference import DenseReference, check_dense_model_is_trained
from ..data.batch_sizes import check_batch_norm_batches
from ..data.encoding import check_label_values, warn_small_groups
from ..data.prepared import count_declared_groups
from ..model_selection import selected_checkpoint, selection_split
from .model_card import run_model_card, violation_warning, write_model_folder_extras
from .predictions import predict_every_row
from .report import group_metrics, run_report, save_report, split_report


def record_dense_model(trainer) -> tuple[dict[str, torch.Tensor], dict[str, DenseReference]]:
    """One eval-mode pass of the (still dense) model of `trainer` over every audited split: each split's per-row
    correctness (what reports compare against), and the `DenseReference` of `train` (the rows the primal step
    trains on) and, with held-out duals, of `constraint`. A dense model at chance on `train` is refused
    (`check_dense_model_is_trained`) before the other splits are read."""
    names = trainer.group_index.names[: trainer.group_index.num_groups]
    correct, references = {}, {}
    for name, dataset in trainer._audited_splits().items():
        logits, labels, groups = predict_every_row(trainer, dataset, f"dense_{name}")
        if isinstance(dataset, datasets.IterableDataset):  # a table's labels: checked when the trainer was built
            check_label_values(labels, trainer.model, name)
        correct[name] = logits.argmax(-1) == labels
        if name == "train" and trainer.data.train_rows is None:  # a stream, counted now that it has been read
            counted_stream(trainer, groups)
        if name in ("train", "constraint"):
            references[name] = DenseReference.from_predictions(logits, labels, groups, names)
        if name == "train":
            check_dense_model_is_trained(references[name].accuracy, labels, trainer.args.allow_weak_dense_model)
    return correct, references


def counted_stream(trainer, groups: torch.Tensor) -> None:
    """After the dense pass over a training stream: its groups' row counts (a declared group without a row is
    refused), the small-group warning, and the batch-of-one check that a map-style set gets when it is built."""
    index, args = trainer.group_index, trainer.args
    count_declared_groups(index, None, torch.bincount(groups, minlength=index.num_groups).tolist())
    if args.mitigation != "none":
        warn_small_groups(index, args.buffer_size)
    if args.world_size == 1:  # several processes: accelerate dispatches a stream's batches otherwise
        check_batch_norm_batches(trainer.model, groups.numel(), args)


def eval_group_metrics(prediction: EvalPrediction, user_metrics, dense_correct, group_index, tolerance: float):
    """`evaluate()`'s metrics: the user's `compute_metrics` (on the labels alone), then, when the group ids rode
    along with the labels, per-group accuracy and (with the dense model's correctness on the same rows) ψ_g."""
    labels, groups = prediction.label_ids, None
    if isinstance(labels, tuple) and len(labels) == 2:
        labels, groups = labels
    metrics = {}
    if user_metrics is not None:
        metrics.update(user_metrics(EvalPrediction(prediction.predictions, labels)))
    if groups is None:
        return metrics
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    correct = torch.as_tensor(logits).argmax(-1) == torch.as_tensor(labels)
    metrics.update(group_metrics(torch.as_tensor(groups).long(), dense_correct, correct, group_index, tolerance))
    return metrics


def audit_run(trainer) -> dict[str, Any]:
    """The `report.json` document of `trainer` (a `CEAGTrainer` after `train()`): one eval-mode pass of the pruned
    model over each audited split, compared row by row with the dense model's recorded correctness."""
    args, index = trainer.args, trainer.group_index
    reports = {}
    for name, dataset in trainer._audited_splits().items():
        logits, labels, groups = predict_every_row(trainer, dataset, f"sparse_{name}")
        reports[name] = split_report(
            groups, trainer.dense_correct[name], logits.argmax(-1) == labels, index.names, args.tolerance,
            num_constrained_groups=index.num_groups, seed=args.seed,
        )  # fmt: skip
    report = run_report(
        args, reports, trainer.pruner, index, trainer.problem, round(trainer.pruning_seconds, 3),
        dense_parent_sparsity=trainer.dense_reference.parent_sparsity,
    )  # fmt: skip
    selected = selected_checkpoint(args, trainer.state)
    if selected is not None:  # the audited weights are that checkpoint's, not the last step's
        report["selected_checkpoint"] = selected
        split = selected["split"] = selection_split(selected["metric"], list(reports))
        if split is not None:
            report["split_rows"][split] += (
                f"; the checkpoint was chosen for its {selected['metric']} on these rows, so their figures are "
                "optimistic: read those of a split that took no part in training or selection"
            )
    note = trainer.data.train_audit_note
    if note:  # the training rows were read through another transform than their own, or through a random one
        report["train_audit"] = note
        for name in ("train", "constraint"):
            if name in report["split_rows"]:
                report["split_rows"][name] += f"; its images were {note}"
    return report


def write_run_card(trainer, report: dict[str, Any], folder: str, card_arguments: dict[str, Any]) -> None:
    """Write `report.json`, the card `README.md` and its plot into `folder`. `card_arguments` are
    `Trainer.create_model_card`'s (`model_name`, `finetuned_from`, `dataset`, `license`), over
    `trainer.card_metadata`, over the data's own name."""
    details = {"dataset": trainer.data.dataset_name, **_given(trainer.card_metadata), **_given(card_arguments)}
    card = run_model_card(
        report, trainer.model, folder, trainer.args, trainer.schedule, list(trainer.group_index.columns),
        trainer.pruner, repo=trainer.hub_model_id or trainer.args.hub_model_id, command=trainer.reproduce_command,
        allow_violated_constraints=trainer._allow_violated_constraints, details=details,
    )  # fmt: skip
    save_report(report, folder)
    write_model_folder_extras(report, card, folder)


def refuse_to_publish(report: dict[str, Any], allow_violated_constraints: bool) -> None:
    """Refuse `push_to_hub`, before anything is uploaded, for a model with a violated training constraint or an
    overall accuracy drop beyond `max_accuracy_drop` (`violation_warning`), unless overridden."""
    warning = violation_warning(report)
    if warning and not allow_violated_constraints:
        raise ValueError(
            f"push_to_hub refused: {warning} Fix the model (e.g. train longer, lower target_sparsity, raise "
            "dual_lr or max_accuracy_drop), or publish it anyway with "
            "push_to_hub(allow_violated_constraints=True), which puts a warning at the top of its card."
        )


def warn_without_processor(folder: str) -> None:
    """Warn that a saved folder holds no image processor, so `pipeline` would preprocess images otherwise than
    training did (the card says it too)."""
    warnings.warn(
        f"{folder} holds no image processor: CEAGTrainer was given no processing_class, and the data's "
        "preprocessing is not one hf-ceag knows, so pipeline() and AutoImageProcessor would preprocess images "
        "otherwise than training did. Pass processing_class=<the image processor that makes your pixel_values> "
        "to CEAGTrainer; the model card says so too.",
        stacklevel=4,
    )


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
