"""Timed training loops: a `TrainerCallback` that times every optimizer step, fine-tuning of an already pruned
model with a plain `transformers.Trainer` or a `CEAGTrainer`, and the arguments of such a run."""

from __future__ import annotations

import copy
import cProfile
import dataclasses
import itertools
import statistics
import time
from typing import Any

import datasets
import torch
from transformers import Trainer, TrainerCallback, set_seed

from hf_ceag import CEAGConfig, CEAGTrainer, MagnitudePruner, prunable_parameters
from hf_ceag.models.classifiers import load_classifier


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock time includes it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall-clock time at the end of every optimizer step; optionally profiles the steps after the warm-up with
    `profiler` (a `cProfile.Profile`, or anything with its `enable()` and `disable()`)."""

    def __init__(self, warmup: int, profiler: cProfile.Profile | Any | None = None) -> None:
        self.warmup, self.profiler, self.times = warmup, profiler, []

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.times.append(time.perf_counter())
        if self.profiler is not None and len(self.times) == self.warmup:
            self.profiler.enable()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.disable()

    def step_seconds(self) -> list[float]:
        """The duration of every step after the warm-up (from the end of step `warmup` on)."""
        steady = self.times[self.warmup - 1 :]
        return [end - start for start, end in itertools.pairwise(steady)]

    def seconds_per_step(self) -> float:
        """The median duration of the steps after the warm-up: the typical step, which a step the machine stalled
        (this 2-core VM moves single steps by ±15 %) does not move. A cost paid on fewer than half the steps is left
        out with the stalls: the log every `logging_steps` (CEAG's one read of its metrics), a new epoch's
        dataloader."""
        return statistics.median(self.step_seconds())


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, list[float]]:
    """The median over rounds of each round's ratio numerator[r] / denominator[r], and those ratios: two
    configurations timed in the same round share that round's machine speed, which the ratio cancels (the ratio
    of the two medians would not: one slow round on either side moves it)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired_ratio: {len(numerator)} and {len(denominator)} rounds; give the same, >= 1.")
    ratios = [n / d for n, d in zip(numerator, denominator)]
    return statistics.median(ratios), ratios


def train_timed(kind: str, model, args: CEAGConfig, train: datasets.Dataset, warmup: int, profiler=None):
    """Fine-tune a copy of `model` for `args.max_steps` steps; seconds per step after the warm-up, and the
    trainer. `kind` 'plain' is a `transformers.Trainer` (group columns dropped), else a `CEAGTrainer`."""
    set_seed(args.seed)
    timer = StepTimer(warmup, profiler)
    model = copy.deepcopy(model)
    if kind.startswith("plain"):
        data = train.remove_columns([c for c in args.group_columns if c in train.column_names])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    else:
        trainer = CEAGTrainer(model=model, args=args, train_dataset=train, callbacks=[timer])
    trainer.train()
    return timer.seconds_per_step(), trainer


def fine_tune_args(config: CEAGConfig, output_dir: str, steps: int, sparsity: float, mitigation: str, **kw):
    """Fine-tuning of an already pruned model: target sparsity reached at step 0, constraints on from step 0."""
    schedule = {"pruning_method": "magnitude", "pruning_start_epoch": 0.0, "pruning_end_epoch": 0.0}
    return dataclasses.replace(
        config,
        output_dir=output_dir,
        max_steps=steps,
        target_sparsity=sparsity,
        mitigation=mitigation,
        mitigate_during_pruning=True,
        save_strategy="no",
        eval_strategy="no",
        allow_weak_dense_model=True,  # a step's time does not depend on how well the dense model was trained
        **schedule,
        **kw,
    )


def pruned_model(dense_dir: str, config: CEAGConfig, sparsity: float):
    """The dense model, magnitude-pruned to `sparsity` with the run's scope."""
    model = load_classifier(dense_dir)
    MagnitudePruner(prunable_parameters(model, config.keep_first_last_dense), config.pruning_scope).prune_to(
        sparsity
    )
    return model
