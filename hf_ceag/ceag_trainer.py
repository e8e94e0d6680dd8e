"""`CEAGTrainer`: a `transformers.Trainer` that prunes a dense classifier and fine-tunes it under per-group
constraints (CEAG), equalized-loss constraints (EL, EL+RB), or none (NFT).

The Trainer's own loop runs unchanged. This class overrides only:
* `compute_loss`: per-sample cross-entropy, the dual step (λ ← [λ + η_λ (ψ̂ − ε)]₊ for groups whose estimates are
  ready), then the primal Lagrangian with the new λ (`constraints.step`);
* `training_step`: masks the pruned weights' gradients before clipping; records a non-finite loss on the device;
* `create_optimizer`: attaches the pruning masks, so that pruned weights stay exactly zero;
* `train`: the dense reference and the step schedule before the first step (or the checkpoint's state);
* `log`, `evaluate`, `save_model`, `create_model_card`, `push_to_hub`: group metrics, reports, cards (`audit`);
* `_determine_best_metric`: the checkpoints `load_best_model_at_end` may pick (`model_selection`).

The datasets are prepared once (`data.prepared`). A training step never reads a value back to the host: group
counts, buffers, readiness and multipliers are fixed-shape tensors, and the metrics accumulate on the device and
are read once per `logging_steps`.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import EvalPrediction, Trainer, default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .audit.predictions import predict_every_row
from .audit.trainer_audit import (
    audit_run,
    eval_group_metrics,
    record_dense_model,
    refuse_to_publish,
    warn_without_processor,
    write_run_card,
)  # fmt: skip
from .callbacks import NonFiniteGuard, NonFiniteWatch, floating_state
from .ceag_config import CEAGConfig
from .checkpoints import check_writable_folder, resume_checkpoint
from .constraints.gather import gather_estimates
from .constraints.held_out import HeldOutRows
from .constraints.problems import GroupConstrainedProblem
from .constraints.reference import DenseReference
from .constraints.state import ConstrainedState
from .constraints.step import ConstrainedStep, DualStepUndo
from .data.batch_sizes import check_batch_norm_batches
from .data.batches import ColumnBatches, ColumnCollator, GroupIdCollator, check_collated_batch
from .data.encoding import LABEL_COLUMNS, check_trainer_inputs
from .data.groups import GROUP_ID_COLUMN, group_counts
from .data.images import keep_columns_after_transform
from .data.prepared import PreparedData, named_splits
from .data.streaming import first_rows, is_streamed
from .model_selection import NothingChosenWarning, check_selection_metric, may_be_best
from .models.classifiers import classifier_logits, make_timm_loadable, save_loadable
from .models.cpu_bf16 import protect_for_cpu_bf16
from .models.rgb_input import narrow_for_grayscale_data
from .pruning.controller import PruningController
from .pruning.magnitude import MagnitudePruner, dense_parent_sparsity, prunable_parameters
from .pruning.schedule import CubicSchedule

__all__ = ["CEAGTrainer", "NonFiniteGuard"]


class CEAGTrainer(Trainer):
    """Drop-in replacement for `transformers.Trainer` that prunes and fine-tunes under group constraints.

    Takes every `Trainer` argument; `args` must be a `CEAGConfig`, and `train_dataset` a `datasets.Dataset` (or a
    stream, `datasets.IterableDataset`, with `max_steps`: `data.streaming`) with the columns named in
    `args.group_columns`. Pass `dense_reference` to reuse dense statistics computed earlier (of the same groups)."""

    # While training, compute_loss normalises by the whole optimizer step's batch (all micro-batches and
    # processes), so the Trainer must not divide it again by the gradient accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, dense_reference: DenseReference | None = None, **kwargs: Any) -> None:
        params = inspect.signature(Trainer.__init__).bind(None, *args, **kwargs).arguments
        params.pop("self")
        config, model, train_dataset = params.get("args"), params.get("model"), params.get("train_dataset")
        narrow_for_grayscale_data(model, train_dataset)  # a grayscale model hf-ceag published as an RGB one
        check_trainer_inputs(config, model, train_dataset, CEAGConfig)
        protect_for_cpu_bf16(model, config)  # oneDNN's bf16 strided convolutions on tiny inputs give NaN
        if config.should_save:  # found now, not when the run first saves (after the dense pass, or hours later)
            check_writable_folder(config.output_dir)
        self.data = PreparedData.prepare(
            config, model, train_dataset, params.get("eval_dataset"), params.get("processing_class")
        )
        self.group_index = self.data.group_index
        self.constraint_dataset = self.data.constraint  # the rows held out for the dual step (or None)
        params.update(
            train_dataset=self.data.train, eval_dataset=self.data.eval, processing_class=self.data.processing_class
        )
        super().__init__(**params)
        check_batch_norm_batches(self.model, self.data.train_rows, self.args)  # no batch of 1 (a stream's: later)
        sampled = config.train_sampling_strategy in ("random", "sequential")
        # the default collator fetches batches as columns; a user's gets the group ids carried around it
        columns = self.data_collator is default_data_collator and sampled
        self.data_collator = (
            ColumnCollator(default_data_collator) if columns else GroupIdCollator(self.data_collator)
        )
        # on the model's device (the Trainer placed it); a model without prunable layers is refused here
        prunable = prunable_parameters(self.model, config.keep_first_last_dense)
        self.pruner = MagnitudePruner(prunable, config.pruning_scope, gradient_hooks=False)  # see training_step
        self.dense_reference = dense_reference
        train_groups = self.group_index.names[: self.group_index.num_groups]
        if dense_reference is not None and dense_reference.group_names != train_groups:
            raise ValueError(
                f"dense_reference: its groups {dense_reference.group_names} differ from the training data's "
                f"{train_groups}: pass the reference computed on this training set, or none."
            )
        self.dense_correct: dict[str, torch.Tensor] = {}
        self.constrained_step: ConstrainedStep | None = None  # built by train(), once the reference is known
        self.constraint_reference: DenseReference | None = None  # the dense model on the held-out rows
        self._held_out: HeldOutRows | None = None
        self._micro_batch = 0  # index of the current micro-batch in its optimizer step
        self._step_group_counts: torch.Tensor | None = None
        self._evaluating_split: str | None = None
        self._allow_violated_constraints = False
        self._saving_checkpoint = False
        self.report: dict[str, Any] | None = None
        self.reproduce_command = ""
        self.card_metadata: dict[str, Any] = {}  # defaults of create_model_card's keyword arguments (dataset, ...)
        self._user_compute_metrics, self.compute_metrics = self.compute_metrics, self._metrics_with_groups
        self.pruning = PruningController(
            self.model, self.pruner, config, self.group_index.num_groups, GROUP_ID_COLUMN,
            calibration_batches=lambda: (self._prepare_inputs(b) for b in self.get_train_dataloader()),
            reduce=lambda t: self.accelerator.reduce(t, reduction="sum") if self.accelerator.num_processes > 1 else t,
            verbose=self.is_local_process_zero() and not config.disable_tqdm,
        )  # fmt: skip
        undo = DualStepUndo(lambda: self.constrained_step, lambda: self.accelerator.optimizer_step_was_skipped)
        for callback in (self.pruning, undo, NonFiniteGuard(), NothingChosenWarning()):
            self.add_callback(callback)
        self.non_finite = NonFiniteWatch()  # every step's loss, read at each log and save and at the end

    @property
    def problem(self) -> GroupConstrainedProblem | None:
        """The run's Cooper problem (multipliers, estimates), once `train()` has built it."""
        return self.constrained_step.problem if self.constrained_step is not None else None

    @property
    def dual_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the multipliers (None for NFT), once `train()` has built it."""
        return self.constrained_step.dual_optimizer if self.constrained_step is not None else None

    @property
    def schedule(self) -> CubicSchedule | None:
        """The pruning schedule in optimizer steps, once `train()` has resolved it."""
        return self.pruning.schedule

    @property
    def pruning_seconds(self) -> float:
        return self.pruning.seconds

    @property
    def constraints_active(self) -> bool:
        """Whether the current step is constrained: a mitigation is set, pruning has ended (or is mitigated)."""
        return self.pruning.constraints_active(self.state.global_step)

    # ---- datasets ----

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if GROUP_ID_COLUMN not in self._signature_columns:
            self._signature_columns.append(GROUP_ID_COLUMN)

    def _remove_unused_columns(
        self, dataset: datasets.Dataset, description: str | None = None
    ) -> datasets.Dataset:
        # A dataset transform reads raw columns (e.g. `image`): drop unused columns from its output instead.
        if is_streamed(dataset):  # the Trainer drops a stream's unused columns in the collator
            return dataset
        self._set_signature_columns_if_needed()
        kept = self.args.remove_unused_columns and keep_columns_after_transform(dataset, self._signature_columns)
        dataset = kept or super()._remove_unused_columns(dataset, description)
        # With the default collator, the dataloaders fetch each batch as columns (data/batches.py)
        return ColumnBatches(dataset) if isinstance(self.data_collator, ColumnCollator) else dataset

    def _eval_splits(self) -> dict[str, datasets.Dataset]:
        return named_splits(self.eval_dataset)

    # ---- set-up before the first step ----

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs: Any):
        """Set up the constrained state (computed once, or restored from the checkpoint being resumed) and
        the pruning schedule, then run `Trainer.train`."""
        self.pruning.resolve(self.data.train_rows)
        check_selection_metric(self.args, list(self._eval_splits()))  # a metric no eval split reports
        streamed, collator = is_streamed(self.train_dataset), self.data_collator
        collator = self._get_collator_with_removed_columns(collator, "training") if streamed else collator
        rows = first_rows(self._remove_unused_columns(self.train_dataset, "training"), 2)
        check_collated_batch(rows, collator, LABEL_COLUMNS)  # a collator or transform dropping labels or group ids
        # the newest complete checkpoint for True (incomplete ones passed over, with a warning); a given one whole
        checkpoint = resume_checkpoint(resume_from_checkpoint, self.args.output_dir, self.args.save_only_model)
        saved = ConstrainedState.load(checkpoint) if checkpoint else None
        if saved is not None:
            train_groups = self.group_index.names[: self.group_index.num_groups]
            saved.check_compatible(self.args, train_groups, held_out=self.constraint_dataset is not None)
            self.dense_reference, self.dense_correct = saved.reference, saved.dense_correct()
            self.constraint_reference = saved.estimate_reference
        elif not self.dense_correct:
            parent_sparsity = dense_parent_sparsity(self.pruner.parameters)  # warns if it is far from dense
            reference = self._compute_dense_statistics()
            if self.dense_reference is None:
                self.dense_reference = reference
            self.dense_reference.parent_sparsity = parent_sparsity  # a given reference describes this parent too
            if self.dense_reference is reference and self.args.should_save:
                self.dense_reference.save(self.args.output_dir)
        if self.constrained_step is None or saved is not None:
            self.constrained_step = ConstrainedStep.for_run(
                self.args, self.dense_reference, self.constraint_reference
            )
        if self.constraint_dataset is not None and self.args.mitigation != "none":
            self._held_out = HeldOutRows(
                self._remove_unused_columns(self.constraint_dataset, "constraint"),
                self.args.per_device_train_batch_size,
                self.args.seed,
                self.data_collator,
                self._prepare_inputs,
                self._not_model_inputs,
            )
        if saved is not None:
            saved.restore(self.problem, self.dual_optimizer, self.pruner)
            self.pruning.seconds = saved.pruning_seconds
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Save the constrained state (identical on every process), then the Trainer checkpoint beside it: the
        Trainer writes `trainer_state.json` last, and removes older checkpoints only once this one is whole."""
        if self.args.should_save and self.problem is not None:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            ConstrainedState.of_trainer(self).save(folder)
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _compute_dense_statistics(self) -> DenseReference:
        # the dense model's pass over every audited split (`audit.trainer_audit.record_dense_model`)
        self.dense_correct, references = record_dense_model(self)
        self.constraint_reference = references.get("constraint")
        return references["train"]

    def _audited_splits(self) -> dict[str, datasets.Dataset]:
        # train (the rows the primal step trains on) and constraint (held out for the dual step, if any), without
        # the training augmentation where an evaluation transform allows; then every eval split
        return {**self.data.audited_training_rows(), **self._eval_splits()}

    def _predict(self, dataset: datasets.Dataset, prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, labels and group ids of every row of `dataset`, in order, on every process (eval mode)."""
        return predict_every_row(self, dataset, prefix)

    @property
    def _not_model_inputs(self) -> tuple[str, ...]:
        return (*LABEL_COLUMNS, GROUP_ID_COLUMN, *self.args.group_columns)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        self.pruner.attach(optimizer)
        return optimizer

    # ---- the step ----

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """`Trainer.training_step` (forward, backward), then the pruned weights' gradients zeroed: before the
        Trainer clips them or the optimizer reads them."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.pruner.mask_gradients()
        self.non_finite.observe(loss, self.state.global_step + 1)
        return loss

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Mean cross-entropy; while training, the primal Lagrangian after this step's dual update."""
        labels = next((inputs[k] for k in LABEL_COLUMNS if k in inputs), None)
        if labels is None:
            raise ValueError(f"CEAGTrainer: the batch has no labels (expected one of {LABEL_COLUMNS}).")
        group_ids = inputs.get(GROUP_ID_COLUMN)
        outputs = model(**{k: v for k, v in inputs.items() if k not in self._not_model_inputs})
        logits = classifier_logits(outputs, model)
        per_sample = F.cross_entropy(
            logits.float(), labels, reduction="none", label_smoothing=self.args.label_smoothing_factor
        )
        if not model.training or self.constrained_step is None:
            loss = per_sample.mean()
        else:
            if group_ids is None:
                raise ValueError(
                    f"CEAGTrainer: the training batch has no {GROUP_ID_COLUMN!r} column. A set_transform or "
                    "data_collator dropped it: pass it through unchanged."
                )
            loss = self.constrained_step.loss(
                per_sample,
                logits.detach().argmax(dim=-1) == labels,
                group_ids,
                self._step_group_counts,
                scale=self.accelerator.num_processes,
                active=self.constraints_active,
                # one dual step per optimizer step, once every micro-batch of that step has been observed
                update_duals=self.accelerator.sync_gradients,
                gather=self._gather,
                held_out=self._held_out_predictions(model),
            )
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's prefetch of one optimizer step's micro-batches; also counts each group in the whole
        step's batch, over all processes, to normalise the step's loss and surrogates."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._micro_batch = 0
        if self.problem is not None:
            ids = [batch[GROUP_ID_COLUMN].reshape(-1) for batch in batch_samples if GROUP_ID_COLUMN in batch]
            ids = (ids[0] if len(ids) == 1 else torch.cat(ids)) if ids else torch.zeros(0, dtype=torch.long)
            ids = ids.to(self.args.device)
            counts = group_counts(ids, self.problem.num_groups)
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            self._step_group_counts = counts
        return batch_samples, num_items_in_batch

    def _held_out_predictions(self, model) -> tuple[torch.Tensor, ...] | None:
        # With held-out duals: this micro-batch's draw of held-out rows, predicted by the bare model.
        if self._held_out is None:
            return None
        draw = self.state.global_step * self.args.gradient_accumulation_steps + self._micro_batch
        self._micro_batch += 1
        bare = self.accelerator.unwrap_model(model)
        return self._held_out.predict(bare, draw, self.args.process_index)

    def _gather(self, group_ids, correct, losses) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # this batch's estimates from every process, in rank order (`constraints.gather`)
        size, num_groups = self.args.per_device_train_batch_size, self.problem.num_groups
        return gather_estimates(self.accelerator, size, num_groups, group_ids, correct, losses)

    # ---- logging ----

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the constraint metrics (summed since the last training log, and the dual state as it is now: one
        read from the device), and the measured sparsity. While training (the end of training included), first
        stop if a step's loss or the weights went non-finite (`NonFiniteWatch`)."""
        if "loss" in logs and self.constrained_step is not None:
            logs.update(self.constrained_step.metrics.flush(self.accelerator))
            logs["sparsity"] = self.pruner.sparsity()
        if self.is_in_train:
            gather = self.accelerator.gather if self.accelerator.num_processes > 1 else None
            step = f"Training stopped at step {self.state.global_step} (epoch {self.state.epoch or 0:.2f})"
            self.non_finite.check(floating_state(self.model), step, logs, self.args.fp16, gather)
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`Trainer.prediction_step` without the group columns; while `evaluate()` runs, the group ids ride
        along with the labels so that the metrics can be computed per group from the same pass."""
        groups = inputs.get(GROUP_ID_COLUMN)
        if not any(k in inputs for k in LABEL_COLUMNS):
            inputs = {k: v for k, v in inputs.items() if k not in self._not_model_inputs}
        loss, logits, labels = super().prediction_step(
            model, inputs, prediction_loss_only, ignore_keys=ignore_keys
        )
        if self._evaluating_split is not None and labels is not None and groups is not None:
            labels = (labels, groups)
        return loss, logits, labels

    # ---- evaluation with per-group metrics ----

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, adding per-group accuracy (`accuracy/<group>`) and, once training has recorded
        the dense model's predictions, ψ_g (`excess_gap/<group>`) and `max_excess_gap`, from the same pass."""
        target = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(target, dict):  # Trainer.evaluate calls back once per named split
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        eval_dataset = self.data.encoded(eval_dataset, "evaluate")
        self._evaluating_split = (
            eval_dataset if isinstance(eval_dataset, str) else "eval" if eval_dataset is None else ""
        )
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating_split = None

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:  # see `model_selection`
        return may_be_best(self, metrics) and super()._determine_best_metric(metrics, trial)

    def _metrics_with_groups(self, prediction: EvalPrediction) -> dict[str, float]:
        # the user's compute_metrics, then per-group accuracy (and ψ_g against the dense model) from the same pass
        dense = self.dense_correct.get(self._evaluating_split)
        return eval_group_metrics(
            prediction, self._user_compute_metrics, dense, self.group_index, self.args.tolerance
        )

    # ---- reports, model card, publishing ----

    def group_report(self) -> dict[str, Any]:
        """Evaluate the pruned model on train and every eval split and compare it, group by group, with the dense
        model's predictions recorded before training: the `report.json` document (also kept as `self.report`)."""
        if not self.dense_correct:
            raise ValueError("group_report: call train() first (it records the dense model's predictions).")
        self.report = audit_run(self)
        return self.report

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; after training, also `report.json`, the card `README.md` and its plot."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.dense_correct:
            self.create_model_card(output_dir=output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Never write a broken model (a checkpoint or the final folder); this process's weights and steps only.
        folder = output_dir or self.args.output_dir
        self.non_finite.check(floating_state(self.model), f"Saving the model to {folder}", fp16=self.args.fp16)
        # The Trainer pickles its arguments into training_args.bin: keep the Hub token out of that file.
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token
        if self.args.should_save:
            # a checkpoint keeps the model as trained (a resume loads it as it is); a published folder loads with
            # timm alone, and a grayscale model in it takes RGB images (`pipeline` on image files)
            if self._saving_checkpoint:
                make_timm_loadable(folder, self.model)
            else:
                save_loadable(folder, self.model)
                if self.processing_class is None:
                    warn_without_processor(folder)

    def create_model_card(self, output_dir: str | None = None, **kwargs: Any) -> None:
        """Write the model card (`README.md`), `report.json` and `excess_gaps.png` into the output folder.

        Keyword arguments of `Trainer.create_model_card` are accepted: `model_name`, `finetuned_from`
        (the dense model's Hub id, shown as base model), `dataset` (the dataset's Hub id) and `license`; those in
        `self.card_metadata` are the defaults (also of the card `push_to_hub` writes)."""
        report = self.report if self.report is not None else self.group_report()
        if not self.is_world_process_zero():
            return
        write_run_card(self, report, output_dir or self.args.output_dir, kwargs)

    def push_to_hub(self, *args: Any, allow_violated_constraints: bool = False, **kwargs: Any):
        """`Trainer.push_to_hub`, refused (before anything is uploaded) when the model violates its training
        constraints, unless `allow_violated_constraints=True` — the card then opens with a warning."""
        refuse_to_publish(
            self.report if self.report is not None else self.group_report(), allow_violated_constraints
        )
        self._allow_violated_constraints = allow_violated_constraints
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._allow_violated_constraints = False
