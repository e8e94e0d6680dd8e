"""The constraint side of a training step: what `CEAGTrainer.compute_loss` hands over once the model has run.

Per micro-batch: record the (gathered) batch in the per-group estimates, take the dual step once per optimizer
step (when its last micro-batch has been observed), and return the primal Lagrangian; undo the dual step of an
optimizer step the fp16 loss scaler skipped. Everything stays on the device: the training-log metrics are summed
there and read once per log (`StepMetrics`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from cooper.optim import nuPI
from cooper.optim.torch_optimizers.nupi_optimizer import nuPIInitType
from transformers import TrainerCallback

from .gaps import buffer_excess_gaps
from .problems import EqualizedLossProblem, ExcessAccuracyGapProblem, GroupConstrainedProblem
from .reference import DenseReference

Gather = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class ConstrainedStep:
    """The problem of a run, its dual optimizer (None for NFT: no dual step, no estimates) and its log metrics."""

    def __init__(self, problem: GroupConstrainedProblem, dual_optimizer: torch.optim.Optimizer | None) -> None:
        self.problem, self.dual_optimizer = problem, dual_optimizer
        self.metrics = StepMetrics(problem, constrained=dual_optimizer is not None)
        self._multipliers_before_step: torch.Tensor | None = None
        self._dual_state_before_step: list[torch.Tensor] = []
        self._dual_step_moved: torch.Tensor | None = None

    @classmethod
    def for_run(
        cls, args, reference: DenseReference, estimate_reference: DenseReference | None = None
    ) -> ConstrainedStep:
        """The problem `args.mitigation` asks for (NFT keeps a CEAG problem for its logs, never stepping its
        duals, without replay buffers: nothing fills them), on `args.device`, with projected ascent on the
        multipliers at `args.dual_lr` by `args.dual_optimizer` (`build_dual_optimizer`). `estimate_reference`:
        the dense model on the held-out rows whose predictions the estimates are built from, if any. CEAG trains at
        `args.tolerance − args.constraint_margin` (which may be negative); the reports judge at `args.tolerance`."""
        buffer_size = 0 if args.mitigation == "none" else args.buffer_size
        if args.mitigation == "equalized_loss":
            problem = EqualizedLossProblem(
                reference, buffer_size, device=args.device, estimate_reference=estimate_reference
            )
        else:
            problem = ExcessAccuracyGapProblem(
                reference,
                buffer_size,
                args.tolerance - getattr(args, "constraint_margin", 0.0),
                device=args.device,
                overall_gradient=args.surrogate_overall_gradient,
                estimate_reference=estimate_reference,
            )
        dual_optimizer = None
        if args.mitigation != "none":
            dual_optimizer = build_dual_optimizer(
                getattr(args, "dual_optimizer", "sgd"),
                problem.dual_parameters(),
                args.dual_lr,
                kp=getattr(args, "nupi_kp", 0.0),
                ki=getattr(args, "nupi_ki", 1.0),
                ema_nu=getattr(args, "nupi_ema_nu", 0.0),
            )
        return cls(problem, dual_optimizer)

    def loss(
        self,
        per_sample: torch.Tensor,
        correct: torch.Tensor,
        group_ids: torch.Tensor,
        step_group_counts: torch.Tensor,
        scale: int,
        active: bool,
        update_duals: bool,
        gather: Gather,
        held_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """This micro-batch's share of the step's loss: the mean cross-entropy over the whole step's batch
        (`step_group_counts`, over all micro-batches and processes; times `scale`, the processes, whose gradients
        DDP averages), or while the constraints are `active` the primal Lagrangian, after the dual step when
        `update_duals` (the step's last micro-batch). `gather` brings every process's rows, in rank order. The
        estimates record this batch, or with held-out duals the `held_out` rows' (group ids, correctness, losses)."""
        if self.dual_optimizer is not None:  # NFT needs no estimates: its logs come from `StepMetrics`
            observed = held_out if held_out is not None else (group_ids, correct, per_sample.detach())
            self.problem.observe(*gather(*observed))
        self.metrics.record(per_sample.detach(), correct, group_ids)
        if not active:
            total = per_sample.sum() if scale == 1 else per_sample.sum() * scale
            return total / step_group_counts.sum()
        # What Cooper's `compute_cmp_state` gives the dual and primal steps (strict violations, primal
        # Lagrangian), computed directly: `tests/test_constraints.py` checks both against Cooper's.
        problem = self.problem
        if update_duals:  # groups not ready: violation 0, their λ_g stays put
            self._dual_step(torch.where(problem.ready, problem.strict_violations(), 0.0))
        return problem.primal_lagrangian(per_sample, group_ids, step_group_counts, scale)

    def _dual_step(self, violations: torch.Tensor) -> None:
        """One ascent step of the multipliers on Cooper's dual Lagrangian λᵀ g (g: the strict violations, 0 for
        the groups not ready), whose gradient in λ is g: known without an autograd pass, so plain SGD's update is
        applied directly and any other dual optimizer is handed g as the gradient (`tests/test_constraints.py`
        checks both against Cooper's `compute_dual_lagrangian().backward()` and the optimizer's step), then
        Cooper's projection (`post_step_`: λ ≥ 0 for inequalities)."""
        problem, optimizer = self.problem, self.dual_optimizer
        weight = problem.multiplier.weight
        lr = plain_ascent_lr(optimizer)
        state = dual_state_tensors(optimizer) if lr is None else []  # nuPI's ξ
        # what undo_if_skipped (and, for nuPI, the rows not ready below) put back
        self._multipliers_before_step = weight.detach().clone()
        self._dual_state_before_step = [t.clone() for t in state]
        # with no group ready, λ stays put and the step is not counted
        self._dual_step_moved = problem.ready.any()
        violations = violations.detach().to(weight.dtype).reshape(weight.shape)
        if lr is not None:
            # the update of the plain SGD dual optimizer, λ ← λ + η g (maximize), without its per-call Python
            # (hooks, parameter-group walk): about 0.1 ms a step inside a CPU run; bit-identical (tested)
            weight.detach().add_(violations, alpha=lr)
        else:
            weight.grad = violations
            optimizer.step()
        # A group not ready has violation 0: SGD leaves its λ_g exactly as it was (nothing to do), but nuPI's
        # proportional term would still move it (and decay its error memory); its row of λ and of the state is
        # put back.
        if state:
            with torch.no_grad():
                weight.copy_(torch.where(problem.ready, weight, self._multipliers_before_step))
                for now, before in zip(dual_state_tensors(optimizer), self._dual_state_before_step):
                    now.copy_(torch.where(problem.ready, now, before))
        problem.multiplier.post_step_()
        problem.dual_step_count += self._dual_step_moved

    def undo_if_skipped(self, skipped: bool) -> None:
        """After the optimizer step: if it was `skipped` (fp16 overflow), put λ, the dual optimizer's state (nuPI's
        error memory) and the dual-step count back."""
        before, self._multipliers_before_step = self._multipliers_before_step, None
        state_before, self._dual_state_before_step = self._dual_state_before_step, []
        if before is not None and skipped:
            with torch.no_grad():
                self.problem.multiplier.weight.copy_(before)
                for now, saved in zip(dual_state_tensors(self.dual_optimizer), state_before):
                    now.copy_(saved)
            self.problem.dual_step_count -= self._dual_step_moved.long()


def build_dual_optimizer(
    name: str, params, lr: float, kp: float = 0.0, ki: float = 1.0, ema_nu: float = 0.0
) -> torch.optim.Optimizer:
    """The ascent optimizer of the multipliers: plain SGD (`"sgd"`), or Cooper's nuPI controller (`"nupi"`),

        ξ_t = ν ξ_(t−1) + (1 − ν) e_t,   λ_(t+1) = [λ_t + η (κ_i e_t + κ_p (ξ_t − ξ_(t−1)))]₊,   ξ_(−1) = 0,

    with e_t the violations (the projection is `multiplier.post_step_()`). ξ_(−1) = 0 (Cooper's `ZEROS`
    initialisation) makes it the PI controller λ_(t+1) = κ_p ξ_t + κ_i Σ_τ e_τ while λ ≥ 0 is not binding, for
    every group from the step it becomes ready: before, its violation is 0 and its row stays put. Its state ξ is
    created here, zero and of fixed shape, so a skipped step and a checkpoint see it from the first step."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, maximize=True)
    if name != "nupi":
        raise ValueError(f"dual_optimizer={name!r} is not one of ['sgd', 'nupi'].")
    optimizer = nuPI(params, lr=lr, Kp=kp, Ki=ki, ema_nu=ema_nu, init_type=nuPIInitType.ZEROS, maximize=True)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["xi"] = torch.zeros_like(p)
    return optimizer


def plain_ascent_lr(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The learning rate of a plain SGD ascent optimizer (one parameter group, maximize, no momentum, weight decay
    or Nesterov, a number for its rate: what `build_dual_optimizer("sgd", ...)` makes), read as it is now (a
    resume or a scheduler may have changed it); None for any other optimizer, whose own `step()` `_dual_step`
    then calls."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    plain = group["maximize"] and not (group["momentum"] or group["weight_decay"] or group["nesterov"])
    return group["lr"] if plain and not isinstance(group["lr"], torch.Tensor) else None


def dual_optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """`"sgd"` or `"nupi"`: the `dual_optimizer` setting that builds `optimizer`."""
    return "nupi" if isinstance(optimizer, nuPI) else "sgd"


def dual_state_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The dual optimizer's per-parameter state tensors, in a fixed order (none for SGD; nuPI's ξ)."""
    if optimizer is None:
        return []
    return [
        value
        for group in optimizer.param_groups
        for p in group["params"]
        for _, value in sorted(optimizer.state[p].items())
        if isinstance(value, torch.Tensor)
    ]


class StepMetrics:
    """The training-log metrics: what each step adds is summed on the device, and read once per log (`flush`).

    Every method: `ce_loss`, the mean cross-entropy of the micro-batches since the last log (a NaN stays NaN,
    for `NonFiniteGuard`), and `max_excess_gap_window`, the largest ψ_g of the model's training predictions since
    the last log (this process's batches, summed over processes at the log). With constraints, also the state
    the last dual step left, read at the log as the Trainer reads `learning_rate`: the largest estimated gap over
    the ready groups (`max_excess_gap_estimate`, or `max_loss_gap_estimate` for EL; none while no group is
    ready), `multiplier_mean`, `multiplier_max` and `full_buffers` (the groups whose estimates are ready)."""

    def __init__(self, problem: GroupConstrainedProblem, constrained: bool) -> None:
        self.problem, self.constrained = problem, constrained
        device = problem.multiplier.weight.device
        self.gap_name = (
            "max_excess_gap_estimate" if isinstance(problem, ExcessAccuracyGapProblem) else "max_loss_gap_estimate"
        )
        self.window = torch.zeros(2, problem.num_groups, device=device)  # [correct, seen] per group
        self.ce_sum = torch.zeros((), device=device)
        self.micro_batches = 0  # recorded since the last log

    @torch.no_grad()
    def record(self, per_sample_loss: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor) -> None:
        """Add one micro-batch."""
        rows = torch.stack([correct.float(), torch.ones_like(per_sample_loss, dtype=torch.float)])
        self.window.index_add_(1, group_ids.long(), rows)
        self.ce_sum += per_sample_loss.float().mean()
        self.micro_batches += 1

    @torch.no_grad()
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
        values = [self.ce_sum, torch.where(window[1] > 0, psi, float("-inf")).max()]
        names = ["ce_loss", "max_excess_gap_window"]
        if self.constrained:
            problem = self.problem
            multipliers = problem.multiplier.weight.detach().float()
            values += [
                torch.where(problem.ready, problem.estimated_gaps(), float("-inf")).max(),
                multipliers.mean(),
                multipliers.max(),
                problem.ready.sum(),
            ]
            names += [self.gap_name, "multiplier_mean", "multiplier_max", "full_buffers"]
        read = torch.stack([v.float() for v in values]).tolist()  # the one read from the device
        logs = dict(zip(names, read))
        if self.micro_batches:
            logs["ce_loss"] /= self.micro_batches
        else:
            del logs["ce_loss"]
        logs = {name: value for name, value in logs.items() if value != float("-inf")}  # none defined yet
        self.window.zero_()
        self.ce_sum.zero_()
        self.micro_batches = 0
        return logs


class DualStepUndo(TrainerCallback):
    """After each optimizer step, undo its dual step if the fp16 loss scaler skipped it. `step()` gives the run's
    `ConstrainedStep` (None before training builds it), `skipped()` whether the optimizer step was skipped."""

    def __init__(self, step: Callable[[], ConstrainedStep | None], skipped: Callable[[], bool]) -> None:
        self.step, self.skipped = step, skipped

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.step() is not None:
            self.step().undo_if_skipped(self.skipped())
