"""When and how a `CEAGTrainer` run prunes, as a Trainer callback: magnitude masks at the cubic schedule's steps,
or FairGRAPE rounds on a geometric schedule, each after its optimizer step (before the next forward) and at the
start of training."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers import TrainerCallback

from .fairgrape import fairgrape_masks, geometric_sparsities, group_importance
from .magnitude import MagnitudePruner
from .schedule import CubicSchedule, fairgrape_round_steps


class PruningController(TrainerCallback):
    """Prunes `model` through `pruner` as `args` (a `CEAGConfig`) schedules it.

    `calibration_batches()` yields prepared training batches (with group ids under `group_key`) for FairGRAPE's
    importance scores, and `reduce(tensor)` sums a tensor over processes (identity with one), so that every
    process prunes the same weights. `schedule` is set by `resolve()` before training; `seconds` is the time
    spent pruning so far. A `target_sparsity` of 0 prunes nothing, which is allowed but said at construction."""

    def __init__(
        self,
        model: nn.Module,
        pruner: MagnitudePruner,
        args,
        num_groups: int,
        group_key: str,
        calibration_batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]],
        reduce: Callable[[torch.Tensor], torch.Tensor],
        verbose: bool,
    ) -> None:
        self.model, self.pruner, self.args, self.num_groups, self.group_key = (
            model,
            pruner,
            args,
            num_groups,
            group_key,
        )
        self.calibration_batches, self.reduce, self.verbose = calibration_batches, reduce, verbose
        if args.target_sparsity == 0:
            warnings.warn(
                "target_sparsity=0: nothing is pruned, so the run fine-tunes the dense model without pruning. Set "
                "target_sparsity to the fraction of weights to zero (e.g. 0.9 for 90 %) to prune.",
                UserWarning,
                stacklevel=3,
            )
        self.schedule: CubicSchedule | None = None
        self.seconds = 0.0

    def resolve(self, train_rows: int | None) -> CubicSchedule:
        """The schedule in optimizer steps, for a training set of `train_rows` rows (None: a stream, whose schedule
        is in steps: `pruning_start_step`, default 0, and `pruning_end_step`, default half of `max_steps`); refuses
        one that ends after training, or a mitigation that would never be on (a constrained run that is NFT under
        another name)."""
        args = self.args
        if train_rows is None:
            steps_per_epoch, total = None, args.max_steps
            start = args.pruning_start_step or 0
            end = args.pruning_end_step if args.pruning_end_step is not None else max(start, total // 2)
        else:
            batch = args.per_device_train_batch_size * max(args.world_size, 1)
            batches = train_rows // batch if args.dataloader_drop_last else math.ceil(train_rows / batch)
            steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
            total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
            start = round(args.pruning_start_epoch * steps_per_epoch)
            end = round(args.resolved_pruning_end_epoch * steps_per_epoch)
            start = start if args.pruning_start_step is None else args.pruning_start_step
            end = end if args.pruning_end_step is None else args.pruning_end_step
        in_steps = steps_per_epoch is None or args.pruning_end_step is not None
        name = "pruning_end_step" if in_steps else "pruning_end_epoch"
        label = f"pruning_end_step={end}" if in_steps else f"pruning_end_epoch={args.resolved_pruning_end_epoch:g}"
        label += "" if in_steps else f" ({end} steps)"
        per_epoch = f", {steps_per_epoch} per epoch" if steps_per_epoch else ""
        if end > total:
            raise ValueError(
                f"{label} is after the end of training ({total} steps{per_epoch}): lower {name} or train longer."
            )
        if args.mitigation != "none" and not args.mitigate_during_pruning and end >= total:
            raise ValueError(
                f"mitigation={args.mitigation!r} with {label} at the end of training ({total} steps): the "
                f"constraints would never be on, and the run would be NFT under another name. Lower {name}, train "
                "longer, or set mitigate_during_pruning=True."
            )
        self.schedule = CubicSchedule(
            args.initial_sparsity, args.target_sparsity, start, end, args.pruning_frequency
        )
        return self.schedule

    def constraints_active(self, step: int) -> bool:
        """Whether optimizer step `step` is constrained: a mitigation is set and pruning has ended (or
        `mitigate_during_pruning`)."""
        if self.args.mitigation == "none" or self.schedule is None:
            return False
        return self.args.mitigate_during_pruning or step >= self.schedule.end

    def on_train_begin(self, args, state, control, **kwargs):
        self.prune_if_scheduled(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.prune_if_scheduled(state.global_step)

    def prune_if_scheduled(self, step: int) -> None:
        """Prune after optimizer step `step` if the schedule says so."""
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
        self.seconds += time.perf_counter() - start

    def _fairgrape_round(self, sparsity: float, index: int, rounds: int) -> None:
        # Score every prunable weight per group on calibration batches, then keep per layer the weights that give
        # each group its share of importance (FairGRAPE), nested in the current masks.
        importance = group_importance(
            self.model,
            self.pruner.parameters,
            self.calibration_batches(),
            self.num_groups,
            masks=self.pruner.masks,
            group_key=self.group_key,
            max_batches=self.args.fairgrape_calibration_batches,
        )
        importance = {k: self.reduce(v) for k, v in importance.items()}
        self.pruner.load_state_dict(fairgrape_masks(importance, sparsity, self.pruner.masks))
        if self.verbose:
            print(f"FairGRAPE round {index + 1}/{rounds}: sparsity {sparsity:.4f}")
