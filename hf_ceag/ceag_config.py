"""`CEAGConfig`: `TrainingArguments` plus what pruning under per-group accuracy constraints needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainingArguments

MITIGATIONS = ("none", "ceag", "equalized_loss")
PRUNING_METHODS = ("magnitude", "fairgrape")
PRUNING_SCOPES = ("layerwise", "global")
DUAL_OPTIMIZERS = ("sgd", "nupi")
NUPI_DEFAULTS = {"nupi_kp": 1.0, "nupi_ki": 1.0, "nupi_ema_nu": 0.0}


@dataclass
class CEAGConfig(TrainingArguments):
    """Training arguments for `CEAGTrainer`. Every `TrainingArguments` field keeps working.

    Accuracies and the tolerance are fractions (0.01 = one point). The pruning schedule is given in epochs
    and resolved to optimizer steps when training starts.

    Defaults that differ from `TrainingArguments`: `logging_nan_inf_filter=False` (a non-finite loss is logged
    as it is); pinned memory only with an accelerator; and with one, batches copied to it without blocking
    (`accelerator_config={"non_blocking": True}`, unless the user set `non_blocking`).
    """

    mitigation: Literal["none", "ceag", "equalized_loss"] = field(
        default="ceag",
        metadata={
            "help": "How to protect groups while fine-tuning the pruned model: 'ceag' constrains every group's "
            "excess accuracy gap to <= tolerance; 'equalized_loss' constrains every group's loss to equal the "
            "overall loss (EL; EL+RB when buffer_size > 0); 'none' is naive fine-tuning (NFT).",
            "choices": list(MITIGATIONS),
        },
    )
    tolerance: float = field(
        default=0.01,
        metadata={"help": "CEAG tolerance epsilon: largest allowed excess accuracy gap per group (a fraction)."},
    )
    constraint_margin: float = field(
        default=0.0,
        metadata={
            "help": "Constrain training at tolerance - delta so that the train-set satisfaction has room to "
            "generalise; reports still judge at tolerance (delta >= 0, a fraction)."
        },
    )
    buffer_size: int = field(
        default=40,
        metadata={
            "help": "Replay buffer size k: each group's estimates use its k most recent training samples (0: "
            "the current mini-batch only)."
        },
    )
    dual_lr: float = field(
        default=1e-2,
        metadata={
            "help": "Learning rate of the Lagrange multipliers (ascent with dual_optimizer); keep it small."
        },
    )
    dual_optimizer: Literal["sgd", "nupi"] = field(
        default="sgd",
        metadata={
            "help": "'sgd': plain projected ascent of the multipliers (the paper's); 'nupi': Cooper's nuPI "
            "controller (Sohrabi et al., ICML 2024), which damps its oscillations (gains nupi_*).",
            "choices": list(DUAL_OPTIMIZERS),
        },
    )
    nupi_kp: float = field(
        default=NUPI_DEFAULTS["nupi_kp"],
        metadata={
            "help": "nuPI proportional gain kappa_p >= 0 on the change of the smoothed violation (with "
            "nupi_ki=1: 0 is plain SGD, 1 optimistic gradient)."
        },
    )
    nupi_ki: float = field(
        default=NUPI_DEFAULTS["nupi_ki"],
        metadata={"help": "nuPI integral gain kappa_i >= 0: each step adds dual_lr * kappa_i * violation."},
    )
    nupi_ema_nu: float = field(
        default=NUPI_DEFAULTS["nupi_ema_nu"],
        metadata={
            "help": "nuPI smoothing nu in [0, 1): the proportional term follows xi_t = nu xi_(t-1) + (1 - nu) "
            "e_t of the violations e_t (0: none)."
        },
    )
    surrogate_overall_gradient: bool = field(
        default=False,
        metadata={
            "help": "CEAG: the primal step also follows the proxy's overall-loss term, as the paper's code "
            "(it can collapse at 99%% sparsity)."
        },
    )
    # Held-out duals: one batch of the held-out rows per micro-batch, in eval mode, against the dense model's
    # accuracy on the same rows, so that the constraints aim at accuracy on data the primal step has not seen.
    constraint_split: float = field(
        default=0.0,
        metadata={
            "help": "Held-out duals: fraction of the training rows (by group) kept from the primal step for the "
            "dual step's estimates (0: none)."
        },
    )
    target_sparsity: float = field(
        default=0.9, metadata={"help": "Final fraction of zero weights in the pruned layers, in [0, 1)."}
    )
    initial_sparsity: float = field(
        default=0.0, metadata={"help": "Sparsity at the start of the cubic schedule, in [0, target_sparsity]."}
    )
    pruning_scope: Literal["layerwise", "global"] = field(
        default="layerwise",
        metadata={
            "help": "'layerwise': every pruned layer to the same sparsity; 'global': rank all weights together.",
            "choices": list(PRUNING_SCOPES),
        },
    )
    pruning_method: Literal["magnitude", "fairgrape"] = field(
        default="magnitude",
        metadata={
            "help": "'magnitude' on the cubic schedule, or 'fairgrape': group-aware importance pruning in "
            "geometric rounds (with mitigation 'none').",
            "choices": list(PRUNING_METHODS),
        },
    )
    fairgrape_rounds: int = field(
        default=3,
        metadata={"help": "FairGRAPE: pruning rounds, spread between the pruning start and end epochs."},
    )
    fairgrape_calibration_batches: int = field(
        default=8, metadata={"help": "FairGRAPE: training batches scored per round for group importance."}
    )
    pruning_start_epoch: float = field(
        default=0.0, metadata={"help": "Epoch at which the cubic pruning schedule starts."}
    )
    pruning_end_epoch: float | None = field(
        default=None,
        metadata={
            "help": "Epoch at which target_sparsity is reached (None: half of num_train_epochs). Fine-tuning "
            "continues after it."
        },
    )
    pruning_start_step: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer step at which the pruning schedule starts; replaces pruning_start_epoch (a stream, "
            "which has no epochs, starts at step 0 by default)."
        },
    )
    pruning_end_step: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer step at which target_sparsity is reached; replaces pruning_end_epoch (a stream's "
            "default: half of max_steps)."
        },
    )
    pruning_frequency: int = field(
        default=10, metadata={"help": "Recompute the pruning masks every this many optimizer steps."}
    )
    keep_first_last_dense: bool = field(
        default=True, metadata={"help": "Keep the first convolution and the last linear layer dense."}
    )
    mitigate_during_pruning: bool = field(
        default=False,
        metadata={
            "help": "Turn the constraints on from the first step; when off, they start once the final sparsity "
            "is reached."
        },
    )
    group_columns: list[str] = field(
        default_factory=lambda: ["group"],
        metadata={
            "help": "Dataset column(s) holding the protected groups (ints or strings); several make "
            "intersectional groups."
        },
    )
    group_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "The protected groups, declared (a stream's, if its group columns are not ClassLabels); with "
            "several columns, 'a & b'. A row of another group is refused."
        },
    )
    max_accuracy_drop: float = field(
        default=0.1,
        metadata={
            "help": "push_to_hub refuses a model whose overall accuracy fell by more than this on a split "
            "(psi_g is relative)."
        },
    )
    allow_weak_dense_model: bool = field(
        default=False,
        metadata={
            "help": "Prune a dense model at most 5 points above chance on its training data (else refused)."
        },
    )
    # TrainingArguments' default (True) replaces a non-finite loss by the running mean, which hides a broken
    # step from `NonFiniteGuard` and reads the loss back to the host on every step.
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Log a NaN/inf loss as the running mean (hiding it from NonFiniteGuard)."},
    )

    def __post_init__(self) -> None:
        self._validate_ceag_fields()
        self._default_non_blocking_copies()
        super().__post_init__()
        # Pinned memory only speeds up copies to an accelerator; without one, torch warns at every dataloader.
        if self.dataloader_pin_memory and (self.use_cpu or not has_accelerator()):
            self.dataloader_pin_memory = False

    def _default_non_blocking_copies(self) -> None:
        # With pinned memory and an accelerator, batches are copied without blocking (accelerate's `non_blocking`,
        # off in `TrainingArguments`): a blocking copy waits for the previous step's kernels to finish, a
        # host-device synchronisation every step, after which the GPU idles while Python prepares the next
        # step. Only where the user left it unset: `accelerator_config` unset, or a dict (or a JSON string of
        # one) without the key; an `AcceleratorConfig` or a JSON file is taken as it is.
        if not self.dataloader_pin_memory or self.use_cpu or not has_accelerator():
            return
        config = self.accelerator_config
        if isinstance(config, str) and config.lstrip().startswith("{"):
            config = json.loads(config)
        if config is None:
            self.accelerator_config = {"non_blocking": True}
        elif isinstance(config, dict):
            self.accelerator_config = {"non_blocking": True, **config}

    def _validate_ceag_fields(self) -> None:
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(
                f"max_accuracy_drop={self.max_accuracy_drop} is outside [0, 1]: give the largest acceptable drop of "
                "overall accuracy as a fraction (0.1 for ten points; 1 accepts any drop)."
            )
        if self.mitigation not in MITIGATIONS:
            raise ValueError(f"mitigation={self.mitigation!r} is not one of {list(MITIGATIONS)}.")
        if self.pruning_scope not in PRUNING_SCOPES:
            raise ValueError(f"pruning_scope={self.pruning_scope!r} is not one of {list(PRUNING_SCOPES)}.")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(
                f"target_sparsity={self.target_sparsity} is outside [0, 1): give the fraction of weights to "
                "zero, e.g. 0.9 for 90 %."
            )
        if not 0.0 <= self.initial_sparsity <= self.target_sparsity:
            raise ValueError(
                f"initial_sparsity={self.initial_sparsity} must lie in [0, target_sparsity={self.target_sparsity}]."
            )
        if self.tolerance < 0:
            raise ValueError(
                f"tolerance={self.tolerance} is negative: give the largest allowed excess accuracy gap as a "
                "fraction >= 0, e.g. 0.01 for one point."
            )
        if self.constraint_margin < 0:
            raise ValueError(
                f"constraint_margin={self.constraint_margin} is negative: give the margin delta >= 0 by which "
                "training tightens the tolerance (0.01 trains at tolerance - 0.01), or 0 for none."
            )
        if self.dual_lr <= 0:
            raise ValueError(f"dual_lr={self.dual_lr} must be > 0, e.g. 1e-2 (keep it small for stability).")
        self._validate_dual_optimizer()
        if self.buffer_size < 0:
            raise ValueError(f"buffer_size={self.buffer_size} must be >= 0 (0 = mini-batch estimates), e.g. 40.")
        if not 0.0 <= self.constraint_split < 1.0:
            raise ValueError(
                f"constraint_split={self.constraint_split} is outside [0, 1): give the fraction of training rows "
                "held out for the dual step, e.g. 0.2, or 0 for the paper's scheme."
            )
        if self.pruning_method not in PRUNING_METHODS:
            raise ValueError(f"pruning_method={self.pruning_method!r} is not one of {list(PRUNING_METHODS)}.")
        if self.pruning_method == "fairgrape" and self.mitigation != "none":
            raise ValueError(
                f"pruning_method='fairgrape' runs with mitigation='none' (FairGRAPE is itself the mitigation), "
                f"got mitigation={self.mitigation!r}."
            )
        if self.fairgrape_rounds < 1 or self.fairgrape_calibration_batches < 1:
            raise ValueError(
                f"fairgrape_rounds={self.fairgrape_rounds} and fairgrape_calibration_batches="
                f"{self.fairgrape_calibration_batches} must both be >= 1."
            )
        if self.pruning_frequency < 1:
            raise ValueError(f"pruning_frequency={self.pruning_frequency} must be >= 1 optimizer step.")
        if self.pruning_start_epoch < 0:
            raise ValueError(f"pruning_start_epoch={self.pruning_start_epoch} must be >= 0.")
        if self.pruning_end_epoch is not None and self.pruning_end_epoch < self.pruning_start_epoch:
            raise ValueError(
                f"pruning_end_epoch={self.pruning_end_epoch} is before pruning_start_epoch="
                f"{self.pruning_start_epoch}."
            )
        self._validate_step_schedule()
        end = self.resolved_pruning_end_epoch
        constrained_phase = self.mitigation != "none" and not self.mitigate_during_pruning
        if constrained_phase and self.max_steps <= 0 and end >= self.num_train_epochs:
            # with max_steps, the trainer checks the same in steps
            raise ValueError(
                f"mitigation={self.mitigation!r}: pruning_end_epoch={end:g} is not before num_train_epochs="
                f"{self.num_train_epochs:g}, so the constraints would never be on and the run would be NFT "
                "under another name. Lower pruning_end_epoch, train longer, or set mitigate_during_pruning."
            )
        if isinstance(self.group_columns, str):
            self.group_columns = [self.group_columns]
        if not self.group_columns or any(not isinstance(c, str) or not c for c in self.group_columns):
            raise ValueError(
                f"group_columns={self.group_columns!r}: give one or more column names, e.g. ['group']."
            )

    def _validate_step_schedule(self) -> None:
        for name in ("pruning_start_step", "pruning_end_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (an optimizer step), or None.")
            epoch = name.replace("_step", "_epoch")
            if value is not None and getattr(self, epoch) not in (None, 0.0):
                raise ValueError(
                    f"{name}={value} and {epoch}={getattr(self, epoch)} both set: give the pruning schedule in "
                    "steps or in epochs, not both."
                )
        start, end = self.pruning_start_step or 0, self.pruning_end_step
        if end is not None and end < start:
            raise ValueError(f"pruning_end_step={end} is before pruning_start_step={start}.")
        if isinstance(self.group_names, str):
            self.group_names = [self.group_names]
        if self.group_names is not None and not self.group_names:
            self.group_names = None

    def _validate_dual_optimizer(self) -> None:
        if self.dual_optimizer not in DUAL_OPTIMIZERS:
            raise ValueError(
                f"dual_optimizer={self.dual_optimizer!r} is not one of {list(DUAL_OPTIMIZERS)}: use 'sgd' (plain "
                "ascent, the paper's) or 'nupi' (Cooper's nuPI controller)."
            )
        for name in ("nupi_kp", "nupi_ki"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name}={getattr(self, name)} is negative: the nuPI gains must be >= 0, e.g. nupi_kp=1.0, "
                    "nupi_ki=1.0."
                )
        if self.nupi_kp == 0 and self.nupi_ki == 0:
            raise ValueError(
                "nupi_kp=0 and nupi_ki=0: the multipliers would never move. Give nupi_ki > 0 (1.0 with nupi_kp=0 "
                "is plain SGD)."
            )
        if not 0.0 <= self.nupi_ema_nu < 1.0:
            raise ValueError(
                f"nupi_ema_nu={self.nupi_ema_nu} is outside [0, 1): give the EMA coefficient of the violations, "
                "e.g. 0.0 (no smoothing)."
            )
        changed = [name for name, default in NUPI_DEFAULTS.items() if getattr(self, name) != default]
        if self.dual_optimizer != "nupi" and changed:
            raise ValueError(
                f"{', '.join(f'{n}={getattr(self, n)}' for n in changed)} set with dual_optimizer="
                f"{self.dual_optimizer!r}, where the nuPI gains do nothing: add dual_optimizer='nupi' "
                "(--dual_optimizer nupi), or drop them."
            )

    @property
    def resolved_pruning_end_epoch(self) -> float:
        """`pruning_end_epoch`, or half of `num_train_epochs` when unset."""
        if self.pruning_end_epoch is not None:
            return self.pruning_end_epoch
        return max(self.pruning_start_epoch, self.num_train_epochs / 2)


def has_accelerator() -> bool:
    """Whether torch sees an accelerator (a GPU or another device it can pin memory for)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator is not None and accelerator.is_available()
