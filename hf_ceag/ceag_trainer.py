"""`CEAGTrainer`: a `transformers.Trainer` that prunes a dense classifier and fine-tunes it under per-group
constraints (CEAG), equalized-loss constraints (EL, EL+RB), or none (NFT).

The Trainer's own loop runs unchanged. This class overrides only:
* `compute_loss`: per-sample cross-entropy, the gathered batch into the per-group estimates, the dual step
  (λ ← [λ + η_λ (ψ̂ − ε)]₊ for groups whose estimates are ready), then the primal Lagrangian with the new λ;
* `training_step`: masks the pruned weights' gradients after the backward pass, before clipping, and records
  a non-finite loss on the device (read at each log and save: nothing broken is saved, `callbacks.NonFiniteWatch`);
* `create_optimizer`: attaches the pruning masks to the optimizer, so that pruned weights stay exactly zero
  (`MagnitudePruner.attach`: their first moments zeroed under SGD/Adam/AdamW, else a pass after each step);
* `train`: computes the dense reference and the step schedule before the first step;
* `log`: adds the constraint metrics (summed since the last log, and the dual state as the log finds it);
* `evaluate`, `save_model`, `create_model_card`, `push_to_hub`: per-group metrics, reports and cards.

Each concern lives with its owner: the constrained step in `constraints.step`, the pruning schedule and FairGRAPE
rounds in `pruning.controller` (a callback), datasets in `data.encoding`, reports and cards in `audit`.

A training step never reads a value back to the host (no `.item()`, no data-dependent shape): group counts,
buffers, readiness and multipliers are fixed-shape tensors, and the metrics accumulate on the device and are
read once per `logging_steps` (with one process; several processes gather each batch's estimates, which
pads uneven batches). NFT keeps no estimates at all beyond its logs.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import EvalPrediction, Trainer, TrainerCallback, default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .audit.model_card import run_model_card, violation_warning, write_model_folder_extras
from .audit.predictions import predict_every_row
from .audit.report import group_metrics, run_report, save_report, split_report
from .callbacks import NonFiniteGuard, NonFiniteWatch, floating_state
from .ceag_config import CEAGConfig
from .checkpoints import check_writable_folder, resume_checkpoint
from .constraints.held_out import HeldOutRows
from .constraints.problems import GroupConstrainedProblem
from .constraints.reference import DenseReference, check_dense_model_is_trained
from .constraints.state import ConstrainedState
from .constraints.step import ConstrainedStep
from .data.batch_sizes import check_batch_norm_batches
from .data.batches import ColumnBatches, ColumnCollator, GroupIdCollator, check_collated_batch
from .data.encoding import (
    LABEL_COLUMNS,
    check_trainer_inputs,
    dataset_display_name,
    encode_eval,
    encode_split,
    split_for_held_out_duals,
    warn_small_groups,
)
from .data.groups import GROUP_ID_COLUMN, GroupIndex, group_counts
from .data.images import keep_columns_after_transform
from .data.preprocessing import audit_transform, known_image_processor, with_transform_of
from .models.classifiers import classifier_logits, make_timm_loadable, save_loadable
from .models.rgb_input import narrow_for_grayscale_data
from .pruning.controller import PruningController
from .pruning.magnitude import MagnitudePruner, dense_parent_sparsity, prunable_parameters
from .pruning.schedule import CubicSchedule

__all__ = ["CEAGTrainer", "NonFiniteGuard"]


class _DualStepUndo(TrainerCallback):
    # After each optimizer step: undo its dual step if the fp16 loss scaler skipped it.
    def __init__(self, trainer: CEAGTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.constrained_step is not None:
            self.trainer.constrained_step.undo_if_skipped(self.trainer.accelerator.optimizer_step_was_skipped)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class CEAGTrainer(Trainer):
    """Drop-in replacement for `transformers.Trainer` that prunes and fine-tunes under group constraints.

    Takes every `Trainer` argument; `args` must be a `CEAGConfig`, and `train_dataset` a `datasets.Dataset`
    with the columns named in `args.group_columns`. Pass `dense_reference` to reuse dense statistics computed
    earlier (they must describe the same training groups).
    """

    # While training, compute_loss normalises by the whole optimizer step's batch (all micro-batches and
    # processes), so the Trainer must not divide it again by the gradient accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, dense_reference: DenseReference | None = None, **kwargs: Any) -> None:
        params = inspect.signature(Trainer.__init__).bind(None, *args, **kwargs).arguments
        params.pop("self")
        config, model, train_dataset = params.get("args"), params.get("model"), params.get("train_dataset")
        narrow_for_grayscale_data(model, train_dataset)  # a grayscale model hf-ceag published as an RGB one
        check_trainer_inputs(config, model, train_dataset, CEAGConfig)
        if config.should_save:  # found now, not when the run first saves (after the dense pass, or hours later)
            check_writable_folder(config.output_dir)
        if (
            params.get("processing_class") is None
        ):  # so that every saved folder is `pipeline`-ready where it can be
            params["processing_class"] = known_image_processor(train_dataset)
        self.dataset_name = dataset_display_name(train_dataset)
        self.group_index = GroupIndex.from_dataset(train_dataset, config.group_columns)
        if config.mitigation != "none":  # NFT has no replay buffers
            warn_small_groups(self.group_index, config.buffer_size)
        train = encode_split(self.group_index, train_dataset, "train")
        params["eval_dataset"] = encode_eval(self.group_index, params.get("eval_dataset"), model)
        # the audit reads the training rows without the training augmentation where an eval transform allows
        self._audit_transform, self.train_audit_note = audit_transform(train, params["eval_dataset"])
        # held-out duals: `constraint_dataset` holds the rows kept out of the primal step (None without them)
        params["train_dataset"], self.constraint_dataset = split_for_held_out_duals(train, config)
        super().__init__(**params)
        check_batch_norm_batches(self.model, len(self.train_dataset), self.args)  # no batch of one row
        if self.data_collator is default_data_collator and config.train_sampling_strategy in (
            "random",
            "sequential",
        ):
            self.data_collator = ColumnCollator(default_data_collator)
        else:  # a collator of the user's: the group ids are carried around it
            self.data_collator = GroupIdCollator(self.data_collator)
        # Built after the Trainer placed the model on its device, so the masks live beside the weights; it
        # refuses a model without prunable layers, still before any training.
        self.pruner = MagnitudePruner(
            prunable_parameters(self.model, config.keep_first_last_dense),
            config.pruning_scope,
            gradient_hooks=False,
        )  # `training_step` masks the gradients, in one fused call
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
        self.add_callback(self.pruning)
        self.add_callback(_DualStepUndo(self))
        self.add_callback(NonFiniteGuard())
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
        """Whether the current step is constrained: a mitigation is set and pruning has ended (or
        `mitigate_during_pruning`)."""
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
        self._set_signature_columns_if_needed()
        kept = self.args.remove_unused_columns and keep_columns_after_transform(dataset, self._signature_columns)
        dataset = kept or super()._remove_unused_columns(dataset, description)
        # With the default collator, the dataloaders fetch each batch as columns (data/batches.py)
        return ColumnBatches(dataset) if isinstance(self.data_collator, ColumnCollator) else dataset

    def _eval_splits(self) -> dict[str, datasets.Dataset]:
        if self.eval_dataset is None:
            return {}
        if isinstance(self.eval_dataset, dict):
            return dict(self.eval_dataset)
        return {"eval": self.eval_dataset}

    # ---- set-up before the first step ----

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs: Any):
        """Set up the constrained state (computed once, or restored from the checkpoint being resumed) and
        the pruning schedule, then run `Trainer.train`."""
        self.pruning.resolve(len(self.train_dataset))
        check_collated_batch(
            self._remove_unused_columns(self.train_dataset, "training"), self.data_collator, LABEL_COLUMNS
        )  # a collator or transform that drops labels or group ids fails now, not after the dense pass
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        saved = ConstrainedState.load(checkpoint) if checkpoint else None
        if saved is not None:
            train_groups = self.group_index.names[: self.group_index.num_groups]
            saved.check_compatible(self.args.mitigation, self.args.buffer_size, train_groups)
            self.dense_reference, self.dense_correct = saved.reference, saved.dense_correct()
            self.constraint_reference = saved.estimate_reference
            if (saved.estimate_reference is None) != (self.constraint_dataset is None):
                raise ValueError(
                    f"Checkpoint was written with{'out' if saved.estimate_reference is None else ''} held-out duals; "
                    f"this run has constraint_split={self.args.constraint_split}. Use the checkpoint's setting."
                )
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

    def _resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        # the newest complete checkpoint for True (incomplete ones passed over, with a warning); a given one whole
        return resume_checkpoint(resume_from_checkpoint, self.args.output_dir, self.args.save_only_model)

    def _save_checkpoint(self, model, trial) -> None:
        """Save the constrained state (identical on every process), then the Trainer checkpoint beside it: the
        Trainer writes `trainer_state.json` last, and removes older checkpoints only once this one is whole."""
        if self.args.should_save and self.problem is not None:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            ConstrainedState.capture(
                self.problem, self.dual_optimizer, self.pruner, self.dense_reference, self.dense_correct,
                self.group_index, self.args.mitigation, self.args.buffer_size, self.constraint_reference,
                self.pruning_seconds,
            ).save(folder)  # fmt: skip
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _compute_dense_statistics(self) -> DenseReference:
        """One eval-mode pass of the (still dense) model over every audited split: the reference (on the rows the
        primal step trains on; with held-out duals also `constraint_reference`, on the held-out rows) and the
        per-sample dense correctness that reports compare against."""
        names = self.group_index.names[: self.group_index.num_groups]
        references = {}
        for name, dataset in self._audited_splits().items():
            logits, labels, groups = self._predict(dataset, f"dense_{name}")
            self.dense_correct[name] = logits.argmax(-1) == labels
            if name in ("train", "constraint"):
                references[name] = DenseReference.from_predictions(logits, labels, groups, names)
            if name == "train":
                check_dense_model_is_trained(references[name].accuracy, labels, self.args.allow_weak_dense_model)
        self.constraint_reference = references.get("constraint")
        return references["train"]

    def _audited_splits(self) -> dict[str, datasets.Dataset]:
        # train = the rows the primal step trains on; constraint = the held-out rows of the dual step, if any;
        # both read without the training augmentation where an evaluation transform allows (`audit_transform`)
        held_out = {"constraint": self.constraint_dataset} if self.constraint_dataset is not None else {}
        training = {"train": self.train_dataset, **held_out}
        if self._audit_transform is not None:
            training = {name: with_transform_of(rows, self._audit_transform) for name, rows in training.items()}
        return {**training, **self._eval_splits()}

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
        """This batch from every process, in rank order, so all processes hold identical estimates.

        Every process pads its rows to `per_device_train_batch_size` (the most a training batch or a held-out
        draw holds, known without asking the others) with rows of group id `num_groups`, which the estimates
        leave out: one all-gather of fixed shape, and nothing read back to the host (accelerate's
        `pad_across_processes` would read every process's size, a synchronisation each step). A batch with more
        rows (a collator that adds rows) is refused; the process that raises ends the launcher's run."""
        if self.accelerator.num_processes == 1:
            return group_ids, correct, losses
        size, rows = self.args.per_device_train_batch_size, group_ids.numel()
        if rows > size:
            raise ValueError(
                f"CEAGTrainer: a process holds {rows} rows for the estimates, more than "
                f"per_device_train_batch_size={size}: batches must come from the Trainer's own dataloader."
            )
        padded = torch.zeros(size, 3, dtype=torch.float32, device=losses.device)
        padded[:, 0] = self.problem.num_groups
        padded[:rows] = torch.stack([group_ids.float(), correct.float(), losses.float()], dim=1)
        padded = self.accelerator.gather(padded)
        return padded[:, 0].long(), padded[:, 1], padded[:, 2]

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
        if isinstance(eval_dataset, datasets.Dataset) and GROUP_ID_COLUMN not in eval_dataset.column_names:
            eval_dataset = encode_split(self.group_index, eval_dataset, "evaluate")
        self._evaluating_split = (
            eval_dataset if isinstance(eval_dataset, str) else "eval" if eval_dataset is None else ""
        )
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating_split = None

    def _metrics_with_groups(self, prediction: EvalPrediction) -> dict[str, float]:
        labels, groups = prediction.label_ids, None
        if isinstance(labels, tuple) and len(labels) == 2:
            labels, groups = labels
        metrics = {}
        if self._user_compute_metrics is not None:
            metrics.update(self._user_compute_metrics(EvalPrediction(prediction.predictions, labels)))
        if groups is None:
            return metrics
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        correct = torch.as_tensor(logits).argmax(-1) == torch.as_tensor(labels)
        groups = torch.as_tensor(groups).long()
        dense = self.dense_correct.get(self._evaluating_split)
        metrics.update(group_metrics(groups, dense, correct, self.group_index, self.args.tolerance))
        return metrics

    # ---- reports, model card, publishing ----

    def group_report(self) -> dict[str, Any]:
        """Evaluate the pruned model on train and every eval split and compare it, group by group, with the
        dense model's predictions recorded before training: the `report.json` document (also kept as
        `self.report`)."""
        if not self.dense_correct:
            raise ValueError("group_report: call train() first (it records the dense model's predictions).")
        splits = self._audited_splits()
        reports = {}
        for name, dataset in splits.items():
            logits, labels, groups = self._predict(dataset, f"sparse_{name}")
            reports[name] = split_report(
                groups,
                self.dense_correct[name],
                logits.argmax(-1) == labels,
                self.group_index.names,
                self.args.tolerance,
                num_constrained_groups=self.group_index.num_groups,
                seed=self.args.seed,
            )
        self.report = run_report(
            self.args, reports, self.pruner, self.group_index, self.problem, round(self.pruning_seconds, 3),
            dense_parent_sparsity=self.dense_reference.parent_sparsity,
        )  # fmt: skip
        if self.train_audit_note:
            self.report["train_audit"] = self.train_audit_note
            for name in ("train", "constraint"):
                if name in self.report["split_rows"]:
                    self.report["split_rows"][name] += f"; its images were {self.train_audit_note}"
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
                    warnings.warn(
                        f"{folder} holds no image processor: CEAGTrainer was given no processing_class, and the "
                        "data's preprocessing is not one hf-ceag knows, so pipeline() and AutoImageProcessor would "
                        "preprocess images otherwise than training did. Pass processing_class=<the image processor "
                        "that makes your pixel_values> to CEAGTrainer; the model card says so too.",
                        stacklevel=2,
                    )

    def create_model_card(self, output_dir: str | None = None, **kwargs: Any) -> None:
        """Write the model card (`README.md`), `report.json` and `excess_gaps.png` into the output folder.

        Keyword arguments of `Trainer.create_model_card` are accepted: `model_name`, `finetuned_from`
        (the dense model's Hub id, shown as base model), `dataset` (the dataset's Hub id) and `license`; those in
        `self.card_metadata` are the defaults (also of the card `push_to_hub` writes)."""
        report = self.report if self.report is not None else self.group_report()
        if not self.is_world_process_zero():
            return
        folder = output_dir or self.args.output_dir
        details = {"dataset": self.dataset_name, **_given(self.card_metadata), **_given(kwargs)}
        card = run_model_card(
            report, self.model, folder, self.args, self.schedule, list(self.group_index.columns), self.pruner,
            repo=self.hub_model_id or self.args.hub_model_id, command=self.reproduce_command,
            allow_violated_constraints=self._allow_violated_constraints, details=details,
        )  # fmt: skip
        save_report(report, folder)
        write_model_folder_extras(report, card, folder)

    def push_to_hub(self, *args: Any, allow_violated_constraints: bool = False, **kwargs: Any):
        """`Trainer.push_to_hub`, refused (before anything is uploaded) when the model violates its training
        constraints, unless `allow_violated_constraints=True` — the card then opens with a warning."""
        report = self.report if self.report is not None else self.group_report()
        warning = violation_warning(report)
        if warning and not allow_violated_constraints:
            raise ValueError(
                f"push_to_hub refused: {warning} Fix the model (e.g. train longer, lower target_sparsity, raise "
                "dual_lr or max_accuracy_drop), or publish it anyway with "
                "push_to_hub(allow_violated_constraints=True), which puts a warning at the top of its card."
            )
        self._allow_violated_constraints = allow_violated_constraints
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._allow_violated_constraints = False
