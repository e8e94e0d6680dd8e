"""`CEAGTrainer`: a `transformers.Trainer` that prunes a dense classifier and fine-tunes it under per-group
constraints (CEAG), equalized-loss constraints (EL, EL+RB), or none (NFT).

The Trainer's own loop runs unchanged. This class overrides only:
* `compute_loss`: per-sample cross-entropy, the gathered batch into the per-group estimates, the dual step
  (λ ← [λ + η_λ (ψ̂ − ε)]₊ for groups whose estimates are ready), then the primal Lagrangian with the new λ;
* `create_optimizer`: attaches the pruning masks to the optimizer (pruned weights zeroed after each step;
  their gradients are masked as autograd produces them, before clipping);
* `train`: computes the dense reference and the step schedule before the first step;
* `log`: adds the constraint metrics accumulated since the last log.

A training step never reads a value back to the host (no `.item()`, no data-dependent shape): group counts,
buffers, readiness and multipliers are fixed-shape tensors, and the metrics accumulate on the device and are
read once per `logging_steps` (with one process; several processes gather each batch's estimates, which
pads uneven batches). NFT keeps no estimates at all beyond its logs.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .audit.model_card import build_model_card, model_card_details, violation_warning, write_model_folder_extras
from .audit.report import build_report, save_report, split_report
from .ceag_config import CEAGConfig
from .constraints.gaps import buffer_excess_gaps
from .constraints.problems import EqualizedLossProblem, ExcessAccuracyGapProblem, GroupConstrainedProblem
from .constraints.reference import DenseReference
from .constraints.state import ConstrainedState
from .data.groups import GROUP_ID_COLUMN, GroupIndex, group_counts
from .data.images import check_label_column, keep_columns_after_transform
from .models.classifiers import classifier_logits, make_timm_loadable
from .pruning.fairgrape import fairgrape_masks, geometric_sparsities, group_importance
from .pruning.magnitude import MagnitudePruner, prunable_parameters, sparsity_definition
from .pruning.schedule import CubicSchedule, fairgrape_round_steps

LABEL_COLUMNS = ("label", "labels")


class _PruningCallback(TrainerCallback):
    """Recomputes the masks at the schedule's steps (after the optimizer step, before the next forward), and
    undoes the dual step of an optimizer step that the fp16 loss scaler skipped."""

    def __init__(self, trainer: CEAGTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._prune_if_scheduled(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._prune_if_scheduled(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._undo_dual_step_if_skipped()


class NonFiniteGuard(TrainerCallback):
    """Stops training with a clear error when a logged loss or gradient norm is not finite, before anything is
    saved: a broken model must not be published. Read at logging steps only, where the values are already on
    the host. Under fp16 the loss scaler skips the steps whose gradients overflow, so only the losses count.
    (The Trainer replaces a non-finite `loss` by the running mean unless `logging_nan_inf_filter=False`;
    `CEAGTrainer` also logs `ce_loss` unfiltered.)"""

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss", "ce_loss") if args.fp16 else ("loss", "ce_loss", "grad_norm")
        bad = {k: logs[k] for k in keys if isinstance((logs or {}).get(k), float) and not math.isfinite(logs[k])}
        if bad:
            raise FloatingPointError(
                f"Training stopped: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step "
                f"{state.global_step} (epoch {state.epoch or 0:.2f}); the model is broken and was not saved. Lower "
                "learning_rate, keep max_grad_norm > 0, or train in fp32 (without bf16/fp16) on this machine."
            )


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
        if not isinstance(config, CEAGConfig):
            raise TypeError(f"CEAGTrainer: args must be a CEAGConfig, got {type(config).__name__}.")
        if model is None:
            raise ValueError("CEAGTrainer: pass the dense model as `model` (model_init is not supported).")
        if not isinstance(train_dataset, datasets.Dataset):
            raise TypeError(
                "CEAGTrainer: train_dataset must be a datasets.Dataset holding the group column(s) "
                f"{config.group_columns}; got {type(train_dataset).__name__}."
            )
        _check_labels(train_dataset, model, "train")
        self.group_index = GroupIndex.from_dataset(train_dataset, config.group_columns)
        _warn_small_groups(self.group_index, config.buffer_size)
        params["train_dataset"] = self._encode(train_dataset, "train")
        params["eval_dataset"] = self._encode_eval(params.get("eval_dataset"), model)
        super().__init__(**params)
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
        self.problem: GroupConstrainedProblem | None = None
        self.dual_optimizer: torch.optim.Optimizer | None = None
        self.schedule: CubicSchedule | None = None
        self._metrics: _StepMetrics | None = None
        self._multipliers_before_step: torch.Tensor | None = None
        self._dual_step_moved: torch.Tensor | None = None
        self._step_group_counts: torch.Tensor | None = None
        self._evaluating_split: str | None = None
        self._allow_violated_constraints = False
        self.report: dict[str, Any] | None = None
        self.pruning_seconds = 0.0
        self.reproduce_command = ""
        self.card_metadata: dict[str, Any] = {}  # defaults of create_model_card's keyword arguments (dataset, ...)
        self._user_compute_metrics, self.compute_metrics = self.compute_metrics, self._metrics_with_groups
        self.add_callback(_PruningCallback(self))
        self.add_callback(NonFiniteGuard())

    # ---- datasets ----

    def _encode_eval(self, eval_dataset, model):
        if eval_dataset is None:
            return None
        named = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        encoded = {}
        for name, dataset in named.items():
            if not isinstance(dataset, datasets.Dataset):
                raise TypeError(f"eval_dataset {name!r} must be a datasets.Dataset with the group column(s).")
            _check_labels(dataset, model, name)
            encoded[name] = self._encode(dataset, name)
        return encoded if isinstance(eval_dataset, dict) else encoded["eval"]

    def _encode(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        """Add the group id column and drop the raw group columns: only the ids are needed from here on,
        and every extra column costs time in the datasets formatter on each batch."""
        encoded = self.group_index.encode(dataset, split)
        raw = [c for c in self.group_index.columns if c in encoded.column_names and c not in LABEL_COLUMNS]
        return encoded.remove_columns(raw) if raw else encoded

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
        return kept or super()._remove_unused_columns(dataset, description)

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
        self.schedule = self._resolve_schedule()
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        saved = ConstrainedState.load(checkpoint) if checkpoint else None
        if saved is not None:
            train_groups = self.group_index.names[: self.group_index.num_groups]
            saved.check_compatible(self.args.mitigation, self.args.buffer_size, train_groups)
            self.dense_reference, self.dense_correct = saved.reference, saved.dense_correct()
        elif not self.dense_correct:
            reference = self._compute_dense_statistics()
            if self.dense_reference is None:
                self.dense_reference = reference
                if self.args.should_save:
                    self.dense_reference.save(self.args.output_dir)
        if self.problem is None or saved is not None:
            self.problem = self._build_problem(self.dense_reference)
            self._metrics = None
            self.dual_optimizer = None
            if self.args.mitigation != "none":
                self.dual_optimizer = torch.optim.SGD(
                    self.problem.dual_parameters(), lr=self.args.dual_lr, maximize=True
                )
        if saved is not None:
            saved.restore(self.problem, self.dual_optimizer, self.pruner)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def _resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        return resume_from_checkpoint or None

    def _save_checkpoint(self, model, trial) -> None:
        """Save the Trainer checkpoint, then the constrained state beside it (identical on every process)."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save and self.problem is not None:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            self._constrained_state().save(folder)

    def _constrained_state(self) -> ConstrainedState:
        return ConstrainedState.capture(
            self.problem,
            self.dual_optimizer,
            self.pruner,
            self.dense_reference,
            self.dense_correct,
            self.group_index,
            self.args.mitigation,
            self.args.buffer_size,
        )

    def _steps_per_epoch(self) -> int:
        args = self.args
        batch = args.per_device_train_batch_size * max(args.world_size, 1)
        n = len(self.train_dataset)
        batches = n // batch if args.dataloader_drop_last else math.ceil(n / batch)
        return max(math.ceil(batches / args.gradient_accumulation_steps), 1)

    def _resolve_schedule(self) -> CubicSchedule:
        args = self.args
        per_epoch = self._steps_per_epoch()
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
        start = round(args.pruning_start_epoch * per_epoch)
        end = round(args.resolved_pruning_end_epoch * per_epoch)
        if end > total:
            raise ValueError(
                f"pruning_end_epoch={args.resolved_pruning_end_epoch:g} ({end} steps) is after the end of training "
                f"({total} steps, {per_epoch} per epoch): lower pruning_end_epoch or train longer."
            )
        if args.mitigation != "none" and not args.mitigate_during_pruning and end >= total:
            raise ValueError(
                f"mitigation={args.mitigation!r} with pruning_end_epoch={args.resolved_pruning_end_epoch:g} ({end} "
                f"steps) at the end of training ({total} steps): the constraints would never be on, and the run "
                "would be NFT under another name. Lower pruning_end_epoch, train longer, or set "
                "mitigate_during_pruning=True."
            )
        return CubicSchedule(args.initial_sparsity, args.target_sparsity, start, end, args.pruning_frequency)

    def _compute_dense_statistics(self) -> DenseReference:
        """One eval-mode pass of the (still dense) model over train and eval splits: the reference and the
        per-sample dense correctness that reports compare against."""
        logits, labels, groups = self._predict(self.train_dataset, "dense_train")
        reference = DenseReference.from_predictions(
            logits, labels, groups, self.group_index.names[: self.group_index.num_groups]
        )
        self.dense_correct["train"] = logits.argmax(-1) == labels
        for name, dataset in self._eval_splits().items():
            logits, labels, _ = self._predict(dataset, f"dense_{name}")
            self.dense_correct[name] = logits.argmax(-1) == labels
        return reference

    @torch.no_grad()
    def _predict(self, dataset: datasets.Dataset, prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, labels and group ids of every row of `dataset`, in order, on every process (eval mode).

        Its own loop rather than `Trainer.predict`: predicting before `train()` marks the model as prepared
        in evaluation mode, and accelerate then never wraps it in DDP for training."""
        model = self.model
        was_training = model.training
        model.eval()
        logits, labels = [], []
        progress = not self.args.disable_tqdm and self.is_local_process_zero()
        for batch in tqdm(self._every_row_dataloader(dataset), desc=prefix, disable=not progress, leave=False):
            batch = self._prepare_inputs(batch)
            target = next(batch[k] for k in LABEL_COLUMNS if k in batch)
            inputs = {k: v for k, v in batch.items() if k not in self._not_model_inputs}
            with self.accelerator.autocast():
                outputs = model(**inputs)
            batch_logits = classifier_logits(outputs, model).float()
            batch_logits, target = self.accelerator.gather_for_metrics((batch_logits, target))
            logits.append(batch_logits.cpu())
            labels.append(target.cpu())
        model.train(was_training)
        groups = torch.tensor(dataset.with_format(None)[GROUP_ID_COLUMN], dtype=torch.long)
        return torch.cat(logits), torch.cat(labels).long(), groups

    def _every_row_dataloader(self, dataset: datasets.Dataset):
        # The Trainer's eval loader drops the last partial batch too when `dataloader_drop_last` is set (meant
        # for training); reference, reports and audits need every row.
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
        try:
            return self.get_eval_dataloader(dataset)
        finally:
            self.args.dataloader_drop_last = drop_last

    @property
    def _not_model_inputs(self) -> tuple[str, ...]:
        return (*LABEL_COLUMNS, GROUP_ID_COLUMN, *self.args.group_columns)

    def _build_problem(self, reference: DenseReference) -> GroupConstrainedProblem:
        device = self.args.device
        if self.args.mitigation == "equalized_loss":
            return EqualizedLossProblem(reference, self.args.buffer_size, device=device)
        # NFT keeps a CEAG problem too, never stepping its duals, to log the estimated gaps.
        return ExcessAccuracyGapProblem(
            reference,
            self.args.buffer_size,
            self.args.tolerance,
            device=device,
            overall_gradient=self.args.surrogate_overall_gradient,
        )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        self.pruner.attach(optimizer)
        return optimizer

    def _prune_if_scheduled(self, step: int) -> None:
        if self.schedule is None:
            return
        start = time.perf_counter()
        if self.args.pruning_method == "fairgrape":
            rounds = fairgrape_round_steps(self.schedule.start, self.schedule.end, self.args.fairgrape_rounds)
            if step not in rounds:
                return
            sparsity = geometric_sparsities(self.args.target_sparsity, len(rounds))[rounds.index(step)]
            self._fairgrape_round(sparsity, rounds.index(step), len(rounds))
        elif self.schedule.is_pruning_step(step):
            self.pruner.prune_to(self.schedule.sparsity_at(step))
        else:
            return
        self.pruning_seconds += time.perf_counter() - start

    def _fairgrape_round(self, sparsity: float, index: int, rounds: int) -> None:
        """Score every prunable weight per group on calibration batches, then keep per layer the weights that
        give each group its share of importance (FairGRAPE), nested in the current masks."""
        batches = (self._prepare_inputs(b) for b in self.get_train_dataloader())
        importance = group_importance(
            self.model,
            self.pruner.parameters,
            batches,
            self.group_index.num_groups,
            masks=self.pruner.masks,
            group_key=GROUP_ID_COLUMN,
            max_batches=self.args.fairgrape_calibration_batches,
        )
        if self.accelerator.num_processes > 1:  # every process prunes the same weights
            importance = {k: self.accelerator.reduce(v, reduction="sum") for k, v in importance.items()}
        self.pruner.load_state_dict(fairgrape_masks(importance, sparsity, self.pruner.masks))
        if self.is_local_process_zero() and not self.args.disable_tqdm:
            print(f"FairGRAPE round {index + 1}/{rounds}: sparsity {sparsity:.4f}")

    @property
    def constraints_active(self) -> bool:
        """Whether the current step is constrained: a mitigation is set and pruning has ended (or
        `mitigate_during_pruning`)."""
        if self.args.mitigation == "none" or self.schedule is None:
            return False
        return self.args.mitigate_during_pruning or self.state.global_step >= self.schedule.end

    # ---- the step ----

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """`Trainer.training_step` (forward, backward), then the pruned weights' gradients zeroed: before the
        Trainer clips them or the optimizer reads them."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.pruner.mask_gradients()
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
        loss = per_sample.mean()
        if model.training and self.problem is not None:
            if group_ids is None:
                raise ValueError(
                    f"CEAGTrainer: the training batch has no {GROUP_ID_COLUMN!r} column. A set_transform or "
                    "data_collator dropped it: pass it through unchanged."
                )
            loss = self._constrained_loss(per_sample, logits.detach(), labels, group_ids)
        return (loss, outputs) if return_outputs else loss

    def _constrained_loss(self, per_sample, logits, labels, group_ids) -> torch.Tensor:
        correct = logits.argmax(dim=-1) == labels
        if self.args.mitigation != "none":  # NFT needs no estimates: its logs come from `_StepMetrics`
            self.problem.observe(*self._gather(group_ids, correct, per_sample.detach()))
        counts, scale = self._step_group_counts, self.accelerator.num_processes
        loss = per_sample.sum() * scale / counts.sum()
        if self.constraints_active:
            # One dual step per optimizer step, once every micro-batch of that step has been observed.
            update_duals = self.accelerator.sync_gradients
            state = self.problem.compute_cmp_state(per_sample, group_ids, counts, scale, update_duals)
            if update_duals:
                self._dual_step(state)
            loss = state.compute_primal_lagrangian().lagrangian
        if self._metrics is None:
            self._metrics = _StepMetrics(self.problem, self.args.mitigation != "none")
        self._metrics.record(per_sample.detach(), correct, group_ids)
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's prefetch of one optimizer step's micro-batches; also counts each group in the whole
        step's batch, over all processes, to normalise the step's loss and surrogates."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.problem is not None:
            ids = [batch[GROUP_ID_COLUMN].reshape(-1) for batch in batch_samples if GROUP_ID_COLUMN in batch]
            ids = torch.cat(ids).to(self.args.device).long() if ids else torch.zeros(0, dtype=torch.long)
            counts = group_counts(ids, self.problem.num_groups)
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            self._step_group_counts = counts
        return batch_samples, num_items_in_batch

    def _gather(self, group_ids, correct, losses) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This batch from every process, in rank order, so all processes hold identical estimates."""
        rows = torch.stack([group_ids.float(), correct.float(), losses.float()], dim=1)
        if self.accelerator.num_processes > 1:
            rows = self.accelerator.gather(self.accelerator.pad_across_processes(rows, dim=0, pad_index=-1))
            rows = rows[rows[:, 0] >= 0]
        return rows[:, 0].long(), rows[:, 1], rows[:, 2]

    def _dual_step(self, state) -> None:
        dual = state.compute_dual_lagrangian()
        if dual.lagrangian is None:
            return
        self._multipliers_before_step = self.problem.multiplier.weight.detach().clone()
        # with no group ready, λ stays put and the step is not counted
        self._dual_step_moved = self.problem.ready.any().long()
        self.dual_optimizer.zero_grad(set_to_none=True)
        dual.lagrangian.backward()
        self.dual_optimizer.step()
        self.problem.multiplier.post_step_()
        self.problem.dual_step_count += self._dual_step_moved

    def _undo_dual_step_if_skipped(self) -> None:
        before, self._multipliers_before_step = self._multipliers_before_step, None
        if before is not None and self.accelerator.optimizer_step_was_skipped:
            with torch.no_grad():
                self.problem.multiplier.weight.copy_(before)
            self.problem.dual_step_count -= self._dual_step_moved

    # ---- logging ----

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the constraint metrics averaged since the last training log (one read from the device), and
        the measured sparsity."""
        if "loss" in logs and self._metrics is not None:
            logs.update(self._metrics.flush(self.accelerator))
            logs["sparsity"] = self.pruner.sparsity()
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
            eval_dataset = self._encode(eval_dataset, "evaluate")
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
        if dense is None or dense.numel() != correct.numel():
            dense = correct  # no dense predictions for this data: accuracies only, ψ_g = 0
        data = split_report(
            groups, dense, correct, self.group_index.names, self.args.tolerance,
            num_constrained_groups=self.group_index.num_groups, min_samples=1, bootstrap_samples=0,
        )  # fmt: skip
        metrics["accuracy"] = data["accuracy_sparse"]
        for group in data["groups"]:
            metrics[f"accuracy/{group['name']}"] = group["accuracy_sparse"]
        if dense is not correct:
            metrics["max_excess_gap"] = data["max_excess_gap"]
            for group in data["groups"]:
                metrics[f"excess_gap/{group['name']}"] = group["excess_gap"]
        return metrics

    # ---- reports, model card, publishing ----

    def group_report(self) -> dict[str, Any]:
        """Evaluate the pruned model on train and every eval split and compare it, group by group, with the
        dense model's predictions recorded before training: the `report.json` document (also kept as
        `self.report`)."""
        if not self.dense_correct:
            raise ValueError("group_report: call train() first (it records the dense model's predictions).")
        splits = {"train": self.train_dataset, **self._eval_splits()}
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
        self.report = build_report(
            method=_method_name(self.args),
            tolerance=self.args.tolerance,
            target_sparsity=self.args.target_sparsity,
            sparsity=self.pruner.sparsity(),
            splits=reports,
            buffer_size=self.args.buffer_size,
            dual_lr=self.args.dual_lr,
            pruning_scope=self.args.pruning_scope,
            group_columns=list(self.group_index.columns),
            sparsity_definition=sparsity_definition(self.args.keep_first_last_dense, len(self.pruner.parameters)),
            layer_sparsity=self.pruner.layer_sparsity(),
            pruning_method=self.args.pruning_method,
            pruning_seconds=round(self.pruning_seconds, 3),
            dual_steps=self.problem.dual_steps if self.problem is not None else 0,
            multipliers=self._final_multipliers(),
        )
        return self.report

    def _final_multipliers(self) -> dict[str, float]:
        if self.problem is None:
            return {}
        names = self.group_index.names[: self.group_index.num_groups]
        return dict(zip(names, self.problem.multipliers_tensor().tolist()))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; after training, also `report.json`, the card `README.md` and its plot."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.dense_correct:
            self.create_model_card(output_dir=output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # The Trainer pickles its arguments into training_args.bin: keep the Hub token out of that file.
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token
        if self.args.should_save:
            make_timm_loadable(output_dir or self.args.output_dir, self.model)

    def create_model_card(self, output_dir: str | None = None, **kwargs: Any) -> None:
        """Write the model card (`README.md`), `report.json` and `excess_gaps.png` into the output folder.

        Keyword arguments of `Trainer.create_model_card` are accepted: `model_name`, `finetuned_from`
        (the dense model's Hub id, shown as base model), `dataset` (the dataset's Hub id) and `license`; those in
        `self.card_metadata` are the defaults (also of the card `push_to_hub` writes)."""
        report = self.report if self.report is not None else self.group_report()
        if not self.is_world_process_zero():
            return
        folder = output_dir or self.args.output_dir
        given = {k: v for k, v in {**self.card_metadata, **kwargs}.items() if v is not None}
        kwargs = {**model_card_details(self.model, folder, self.pruner.parameters), **given}
        timm_architecture = getattr(getattr(self.model, "config", None), "architecture", None)
        card = build_model_card(
            report,
            model_name=kwargs.get("model_name") or os.path.basename(os.path.abspath(folder)),
            repo_or_path=self.hub_model_id or self.args.hub_model_id or os.path.abspath(folder),
            training=self._card_training_settings(),
            base_model=kwargs.get("finetuned_from")
            or getattr(getattr(self.model, "config", None), "_name_or_path", None),
            dataset_name=kwargs.get("dataset") if isinstance(kwargs.get("dataset"), str) else None,
            command=self.reproduce_command,
            timm_architecture=timm_architecture if isinstance(timm_architecture, str) else None,
            allow_violated_constraints=self._allow_violated_constraints,
            **{k: kwargs[k] for k in ("license", "task", "grayscale", "layer_names", "with_processor")},
        )
        save_report(report, folder)
        write_model_folder_extras(report, card, folder)

    def _card_training_settings(self) -> dict[str, Any]:
        args, schedule = self.args, self.schedule
        pruning = f"magnitude, {args.pruning_scope}, cubic schedule"
        if schedule is not None:
            pruning += f" from step {schedule.start} to {schedule.end}, masks every {schedule.frequency} steps"
        if args.keep_first_last_dense:
            pruning += "; first conv and last linear layer kept dense"
        return {
            "pruning": pruning,
            "buffer_size": args.buffer_size,
            "dual_lr": args.dual_lr,
            "epochs": args.num_train_epochs if args.max_steps <= 0 else f"{args.max_steps} steps",
            "group_columns": list(self.group_index.columns),
        }

    def push_to_hub(self, *args: Any, allow_violated_constraints: bool = False, **kwargs: Any):
        """`Trainer.push_to_hub`, refused (before anything is uploaded) when the model violates its training
        constraints, unless `allow_violated_constraints=True` — the card then opens with a warning."""
        report = self.report if self.report is not None else self.group_report()
        warning = violation_warning(report)
        if warning and not allow_violated_constraints:
            raise ValueError(
                f"push_to_hub refused: {warning} Fix the model (e.g. train longer, lower target_sparsity, raise "
                "dual_lr), or publish it anyway with push_to_hub(allow_violated_constraints=True), which puts a "
                "warning at the top of its card."
            )
        self._allow_violated_constraints = allow_violated_constraints
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._allow_violated_constraints = False


class _StepMetrics:
    """The training-log metrics, summed on the device step after step and read once per log (`flush`).

    Every method: `ce_loss` (a NaN stays NaN, for `NonFiniteGuard`) and `max_excess_gap_window`, the largest
    ψ_g of the model's training predictions since the last log (this process's batches, summed over processes
    at the log). With constraints, also what the dual step sees: the largest estimated gap
    (`max_excess_gap_estimate`, or `max_loss_gap_estimate` for EL) over the ready groups, `multiplier_mean`,
    `multiplier_max` and `full_buffers`, averaged over the steps where they are defined."""

    def __init__(self, problem: GroupConstrainedProblem, constrained: bool) -> None:
        self.problem, self.constrained = problem, constrained
        device = problem.multiplier.weight.device
        self.gap_name = (
            "max_excess_gap_estimate" if isinstance(problem, ExcessAccuracyGapProblem) else "max_loss_gap_estimate"
        )
        self.window = torch.zeros(2, problem.num_groups, device=device)  # [correct, seen] per group
        self.sums = torch.zeros(5, device=device)  # ce_loss, gap estimate, multiplier mean/max, full buffers
        self.counts = torch.zeros(5, device=device)
        # a non-finite cross-entropy is a broken step: it is kept (the others' -inf means "not defined yet")
        self.always = torch.tensor([True, False, False, False, False], device=device)

    @torch.no_grad()
    def record(self, per_sample_loss: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor) -> None:
        rows = torch.stack([correct.float(), torch.ones_like(per_sample_loss, dtype=torch.float)])
        self.window.index_add_(1, group_ids.long(), rows)
        ce = per_sample_loss.float().mean()
        if not self.constrained:
            self.sums[0] += ce
            self.counts[0] += 1
            return
        problem = self.problem
        multipliers = problem.multiplier.weight.detach()
        values = torch.stack([
            ce,
            problem.estimated_gaps().masked_fill(~problem.ready, float("-inf")).max(),
            multipliers.mean(),
            multipliers.max(),
            problem.ready.sum().float(),
        ])  # fmt: skip
        defined = torch.isfinite(values) | self.always
        self.sums += torch.where(defined, values, 0.0)
        self.counts += defined

    def flush(self, accelerator) -> dict[str, float]:
        window = self.window
        if accelerator.num_processes > 1:
            window = accelerator.reduce(window, reduction="sum")
        reference = self.problem.reference
        psi = buffer_excess_gaps(
            reference["group_accuracy"],
            window[0] / window[1].clamp(min=1),
            reference["group_weights"],
            window[1] > 0,
        )
        window_max = torch.where(window[1] > 0, psi, float("-inf")).max().reshape(1)
        values = torch.cat([self.sums, self.counts, window_max]).tolist()  # the one read from the device
        sums, counts, window_max = values[:5], values[5:10], values[10]
        names = ["ce_loss", self.gap_name, "multiplier_mean", "multiplier_max", "full_buffers"]
        logs = {name: s / c for name, s, c in zip(names, sums, counts) if c > 0}
        if math.isfinite(window_max):
            logs["max_excess_gap_window"] = window_max
        self.window.zero_()
        self.sums.zero_()
        self.counts.zero_()
        return logs


def _method_name(args: CEAGConfig) -> str:
    if args.pruning_method == "fairgrape":
        return "fairgrape"
    if args.mitigation == "none":
        return "nft"
    if args.mitigation == "equalized_loss":
        return "el+rb" if args.buffer_size > 0 else "el"
    return "ceag"


def _check_labels(dataset: datasets.Dataset, model, split: str) -> None:
    column = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    if column is None:
        raise ValueError(
            f"The {split} dataset has no label column (expected one of {LABEL_COLUMNS}); columns: "
            f"{dataset.column_names}. Rename yours, e.g. dataset.rename_column('<yours>', 'label')."
        )
    check_label_column(dataset, column, split)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is None:
        return
    values = torch.as_tensor(dataset.with_format(None)[column])
    if values.numel() and (values.min() < 0 or values.max() >= num_labels):
        bad = values[(values < 0) | (values >= num_labels)].unique().tolist()[:10]
        raise ValueError(
            f"{split} column {column!r} holds label(s) {bad} outside the model's classes 0..{num_labels - 1}: "
            "build the model with num_labels covering every class, or map the labels to 0..num_labels-1."
        )


def _warn_small_groups(index: GroupIndex, buffer_size: int) -> None:
    # Buffers carry over between epochs, so a small group's buffer does fill, after buffer_size / n epochs;
    # but it then holds some images twice, and its estimate reacts to the model more slowly.
    small = [f"{name} (n={n})" for name, n in zip(index.names, index.train_counts) if n < buffer_size]
    if small:
        warnings.warn(
            f"Group(s) {small} have fewer training samples than buffer_size={buffer_size}: their buffers fill "
            "only after more than one epoch and then repeat images, so their constraints start late and react "
            "slowly. Consider a smaller buffer_size or merging groups.",
            stacklevel=3,
        )
