"""Which checkpoints `load_best_model_at_end` (or `save_strategy="best"`) may pick, and what the report says about
the one it picked.

The Trainer's own rule keeps the checkpoint whose `metric_for_best_model` is best. On a pruning run two kinds of
checkpoint must never win, whatever the metric says:
* one taken before the pruning schedule ended: it is less sparse than `target_sparsity` (its loss, and often its
  max ψ_g, are lower *because* it is less pruned), so the published model would miss the sparsity asked for;
* one whose overall accuracy, on the split the metric is measured on, fell by more than `max_accuracy_drop` from
  the dense model's there: ψ_g is relative, so a model that lost accuracy everywhere has small excess gaps, and
  the publishing gate would refuse it anyway. (Only that split's drop counts: a test split evaluated alongside
  must take no part in the choice.)
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

# what `not_a_candidate` rules out, as the warning for a run where nothing qualified says it
NO_CANDIDATE = "none was evaluated and saved at the final sparsity with its accuracy drop within max_accuracy_drop"
ACCURACY_DROP = "accuracy_drop"  # the per-split metric `evaluate()` adds: dense accuracy − sparse accuracy


def not_a_candidate(
    step: int,
    pruning_end: int | None,
    metrics: dict[str, float],
    metric: str,
    splits: list[str],
    drop_limit: float,
) -> str:
    """Why the checkpoint of optimizer step `step`, evaluated as `metrics` on the eval `splits`, cannot be the best
    model by `metric` (`metric_for_best_model`) ('' if it can): pruning (whose schedule reaches its final sparsity
    at step `pruning_end`) has not ended, or the accuracy drop of the split `metric` is measured on
    (`selection_split`) exceeds `drop_limit` (`max_accuracy_drop`). Only that split's drop counts: a test split
    evaluated alongside a validation split must take no part in choosing the model."""
    if pruning_end is not None and step < pruning_end:
        return f"it is from before the final sparsity (pruning ends at step {pruning_end})"
    split = selection_split(metric if metric.startswith("eval_") else f"eval_{metric}", splits)
    key = f"eval_{ACCURACY_DROP}" if split == "eval" else f"eval_{split}_{ACCURACY_DROP}"
    drop = metrics.get(key) if split is not None else None
    if drop is not None and drop > drop_limit:
        return f"its overall accuracy fell too far ({key} = {drop:.4f} > max_accuracy_drop = {drop_limit:g})"
    return ""


def may_be_best(trainer, metrics: dict[str, float]) -> bool:
    """Whether the checkpoint `trainer` (a `CEAGTrainer`) just evaluated as `metrics` may be the best model
    (`not_a_candidate`); the log says why not."""
    args, schedule, step = trainer.args, trainer.schedule, trainer.state.global_step
    if args.metric_for_best_model is None:
        return True
    end = schedule.end if schedule is not None else None
    splits = list(trainer._eval_splits())
    why = not_a_candidate(step, end, metrics, args.metric_for_best_model, splits, args.max_accuracy_drop)
    if why:
        logger.info(f"Step {step} cannot be the best model: {why}.")
    return not why


class NothingChosenWarning(TrainerCallback):
    """At the end of training, warn when `load_best_model_at_end` found no checkpoint that could be the best model,
    so that the model is the last step's."""

    def on_train_end(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint is None:
            warnings.warn(
                f"load_best_model_at_end: no checkpoint could be the best model ({NO_CANDIDATE}), so the model is the "
                "last step's. Evaluate and save after pruning ends (eval_steps, save_steps), or raise "
                "max_accuracy_drop.",
                stacklevel=2,
            )


def selected_checkpoint(args, state) -> dict[str, Any] | None:
    """What `report.json` records when `load_best_model_at_end` loaded a checkpoint at the end of training: its
    folder's name, step, the metric and its value; None when the final weights are the last step's."""
    if not args.load_best_model_at_end or state.best_model_checkpoint is None:
        return None
    metric = args.metric_for_best_model
    return {
        "checkpoint": os.path.basename(os.path.normpath(state.best_model_checkpoint)),
        "step": state.best_global_step,
        "last_step": state.global_step,
        "metric": metric if metric.startswith("eval_") else f"eval_{metric}",
        "value": state.best_metric,
        "greater_is_better": bool(args.greater_is_better),
    }


def selection_split(metric: str, splits: list[str]) -> str | None:
    """The audited split (of `splits`: "eval" for a single eval dataset, else the names of the dict given as
    `eval_dataset`) that `metric` (`eval_<split>_…`, or `eval_…` for a single one) is measured on, or None."""
    prefixes = {name: "eval_" if name == "eval" else f"eval_{name}_" for name in splits if name != "train"}
    matches = [name for name, prefix in prefixes.items() if metric.startswith(prefix)]
    return max(matches, key=lambda name: len(prefixes[name])) if matches else None


def check_selection_metric(args, eval_splits: list[str]) -> None:
    """Refuse, before training, `metric_for_best_model` that no evaluation would report: with several eval splits
    (a dict as `eval_dataset`) the Trainer names every metric `eval_<split>_…`, so the metric must name its split
    (else the Trainer fails at the first evaluation, after training has begun)."""
    selecting = args.load_best_model_at_end or args.save_strategy == "best"
    if not selecting or args.metric_for_best_model is None or not eval_splits or "eval" in eval_splits:
        return
    metric = args.metric_for_best_model
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    if selection_split(metric, eval_splits) is None:
        example = next((name for name in eval_splits if name != "test"), eval_splits[0])
        raise ValueError(
            f"metric_for_best_model={args.metric_for_best_model!r}: with eval_dataset a dict of splits "
            f"{eval_splits}, every metric is named after its split. Name the split to choose the checkpoint on, "
            f"e.g. metric_for_best_model='{example}_max_excess_gap' (with greater_is_better=False)."
        )
