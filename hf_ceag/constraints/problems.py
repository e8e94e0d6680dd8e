"""The constrained problems, expressed with Cooper: one constraint per group, one multiplier λ_g each.

* `ExcessAccuracyGapProblem` (CEAG, DESIGN §2): ψ_g ≤ ε. The dual step uses the true accuracy gaps
  ψ̂_g − ε estimated from replay buffers (`strict_violations`); the primal step uses the differentiable
  surrogate ψ̃_g = (L_g − L_g^dense) − (L − L^dense) on the mini-batch (`surrogate_violations`, Cotter et al.
  2019).
* `EqualizedLossProblem` (EL, Tran et al. 2022): L_g − L = 0, an equality constraint; with replay
  buffers of losses (EL+RB) when `buffer_size > 0`.

Both keep, per group, an estimate built from *all* processes' samples (the trainer gathers them), so every
process takes the same dual step. With `buffer_size = 0` the estimate is the last mini-batch's.

Every tensor has a fixed shape `[num_groups]` whatever the batch holds: groups absent from a batch, or not yet
ready, are masked (violation 0) rather than indexed out, so a step never reads a value back to the host.
"""

from __future__ import annotations

import abc
import math

import torch
from cooper import CMPState, ConstrainedMinimizationProblem, Constraint, ConstraintState, ConstraintType
from cooper.formulations import Lagrangian
from cooper.multipliers import DenseMultiplier

from ..data.groups import group_counts, group_means
from .gaps import buffer_excess_gaps, weighted_mean
from .reference import DenseReference
from .replay_buffer import ReplayBuffer


class GroupConstrainedProblem(ConstrainedMinimizationProblem):
    """One constraint per group with a Cooper `DenseMultiplier`; subclasses define the constraint.

    `observe()` records a (gathered, detached) batch into the per-group estimates; `compute_cmp_state()`
    builds the Cooper state from the local, differentiable per-sample losses. The training step
    (`ConstrainedStep.loss`) takes the same dual and primal steps without building it: `strict_violations()` and
    `primal_lagrangian()`, which `tests/test_constraints.py` checks against Cooper's dual and primal Lagrangians.

    `reference` is the dense model on the rows the primal step trains on (the surrogates' dense losses);
    `estimate_reference`, when the estimates come from other rows (held-out duals), the dense model on those
    rows (the accuracies ψ̂_g compares with, and the group shares that weight the overall accuracy).
    """

    constraint_type: ConstraintType
    observed_quantity: str  # "correct" or "loss": what the buffers hold
    # Does the primal step differentiate the overall loss L inside the surrogates (L_g − L_g^ref) − (L − L^ref)?
    overall_gradient: bool = True

    def __init__(
        self,
        reference: DenseReference,
        buffer_size: int,
        device: torch.device | str = "cpu",
        estimate_reference: DenseReference | None = None,
    ) -> None:
        super().__init__()
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0 (0 = mini-batch estimates), got {buffer_size}.")
        if estimate_reference is not None and estimate_reference.group_names != reference.group_names:
            raise ValueError(
                f"estimate_reference is for groups {estimate_reference.group_names}, the reference for "
                f"{reference.group_names}: compute both on the same groups."
            )
        self.num_groups = reference.num_groups
        self.reference = {k: v.to(device) for k, v in reference.tensors().items()}
        self.estimate_reference = {k: v.to(device) for k, v in (estimate_reference or reference).tensors().items()}
        self.dense_loss = torch.tensor(reference.loss, dtype=torch.float32, device=device)
        # the surrogates' reference losses L_g^ref and L^ref (CEAG: the dense model's; EL: none)
        self.surrogate_group_reference, self.surrogate_reference = self.reference["group_loss"], self.dense_loss
        self.multiplier = DenseMultiplier(num_constraints=self.num_groups, device=device)
        self.group_constraint = Constraint(
            self.constraint_type, formulation_type=Lagrangian, multiplier=self.multiplier
        )
        self.buffer = ReplayBuffer(self.num_groups, buffer_size, device) if buffer_size > 0 else None
        zeros = torch.zeros(self.num_groups, device=device)
        self.group_estimate, self.estimate_weights = zeros, zeros.clone()
        self.observed = torch.zeros(self.num_groups, dtype=torch.bool, device=device)
        self.ready = self.observed.clone()
        # dual updates that moved a multiplier (the trainer counts them on the device; reports and checkpoints
        # read them)
        self.dual_step_count = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def observe(self, group_ids: torch.Tensor, correct: torch.Tensor, losses: torch.Tensor) -> None:
        """Record one batch of (all processes') samples into the per-group estimates.

        Buffers: estimate = mean of each group's buffer, ready = buffer full, weights = training shares; only
        full buffers count, in ψ̂_g and in the overall accuracy inside it alike (DESIGN §2.3).
        No buffers: estimate = this batch's group mean, ready = present, weights = batch counts.
        Rows of group id `num_groups` are padding (a fixed-shape gather across processes): left out.
        """
        values = (correct if self.observed_quantity == "correct" else losses).float()
        group_ids = group_ids.long()
        if self.buffer is not None:
            self.buffer.update(group_ids, values)
            self.group_estimate = self.buffer.means()
            self.observed = self.ready = self.buffer.is_full
            self.estimate_weights = self.estimate_reference["group_weights"]
        else:
            means, counts = group_means(values, group_ids, self.num_groups + 1)  # the last: padding
            self.group_estimate, counts = means[: self.num_groups], counts[: self.num_groups]
            self.observed = self.ready = counts > 0
            self.estimate_weights = counts.float()

    violation_offset = 0.0  # the bound the estimated gaps are held to (EL: 0)

    def strict_violations(self, gaps: torch.Tensor | None = None) -> torch.Tensor:
        """Non-differentiable violation of every group's constraint from the current estimates, `[G]`: the
        estimated gaps (`gaps`, if already computed) minus `violation_offset`."""
        return (self.estimated_gaps() if gaps is None else gaps) - self.violation_offset

    def surrogate_violations(self, group_loss: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Differentiable violation of every group's constraint from mini-batch losses, `[G]`:
        (L_g − L_g^ref) − (L − L^ref), with L held constant unless `overall_gradient`."""
        if not self.overall_gradient:
            loss = loss.detach()
        return (group_loss - self.surrogate_group_reference) - (loss - self.surrogate_reference)

    @abc.abstractmethod
    def estimated_gaps(self) -> torch.Tensor:
        """The per-group quantity the constraint bounds, from the current estimates (for logs), `[G]`."""

    def compute_cmp_state(
        self,
        per_sample_loss: torch.Tensor,
        group_ids: torch.Tensor,
        step_group_counts: torch.Tensor | None = None,
        scale: float = 1.0,
        update_duals: bool = True,
    ) -> CMPState:
        """Cooper state: `violation` (differentiable surrogates, 0 for the groups absent from the step's batch),
        `strict_violation` (0 for the groups whose estimates are not ready: only the others' λ_g move).

        `per_sample_loss` may be one slice (a micro-batch, one process's share) of the optimizer step's batch.
        Sums are then normalised by `step_group_counts` — the per-group counts of the *whole* step's batch,
        over all micro-batches and processes — and multiplied by `scale` (the number of processes, whose
        gradients DDP averages), so that the slices' gradients add up to those of the whole batch. Without
        `step_group_counts` the slice is the whole batch.
        """
        group_ids = group_ids.long()
        if step_group_counts is None:
            step_group_counts = group_counts(group_ids, self.num_groups)
        total = step_group_counts.sum().clamp(min=1)
        loss = per_sample_loss.sum() * scale / total
        sums = torch.zeros(self.num_groups, dtype=per_sample_loss.dtype, device=per_sample_loss.device)
        group_loss = sums.index_add(0, group_ids, per_sample_loss) * scale / step_group_counts.clamp(min=1)
        # Absent groups have no surrogate, groups not ready no estimate: their violations are 0, so λ_g · 0
        # adds nothing to the primal step and the dual step leaves λ_g where it is (plain SGD ascent).
        present = step_group_counts > 0
        gaps = self.estimated_gaps()
        state = ConstraintState(
            violation=torch.where(present, self.surrogate_violations(group_loss, loss), 0.0),
            strict_violation=torch.where(self.ready, self.strict_violations(gaps), 0.0),
            contributes_to_dual_update=update_duals,
        )
        # the estimated gaps the strict violations came from, for the logs (`misc["estimated_gaps"]`)
        return CMPState(
            loss=loss, observed_constraints={self.group_constraint: state}, misc={"estimated_gaps": gaps}
        )

    def primal_lagrangian(
        self,
        per_sample_loss: torch.Tensor,
        group_ids: torch.Tensor,
        step_group_counts: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Cooper's `compute_cmp_state(...).compute_primal_lagrangian().lagrangian` with the current λ — the same
        value and gradient — written as one weighted sum of the per-sample losses (arguments as there).

        L + Σ_g λ_g ψ̃_g, with ψ̃_g = (L_g − L_g^ref) − (L − L^ref) for the groups present in the step's batch,
        L = s Σ_i ℓ_i / N and L_g = s Σ_(i∈g) ℓ_i / n_g, is Σ_i w_i ℓ_i + c with the detached weights
        w_i = s (a / N + λ_(g_i) / n_(g_i)), a = 1 (L held constant in ψ̃_g) or 1 − Σ_g λ_g (`overall_gradient`),
        and c = Σ_g λ_g (L^ref − L_g^ref) − (Σ_g λ_g L if L is held constant): backward then runs through one
        product, not through every group's surrogate (`tests/test_constraints.py` checks it against Cooper)."""
        group_ids = group_ids.long()
        if step_group_counts is None:
            step_group_counts = group_counts(group_ids, self.num_groups)
        total = step_group_counts.sum().clamp(min=1)
        multipliers = self.multiplier.weight.detach().reshape(-1) * (step_group_counts > 0)  # absent groups: 0
        per_group = multipliers / step_group_counts.clamp(min=1)
        constant = multipliers @ (self.surrogate_reference - self.surrogate_group_reference)
        if self.overall_gradient:
            overall = (1.0 - multipliers.sum()) / total
        else:
            overall = total.reciprocal()
            constant = constant - multipliers.sum() * (per_sample_loss.detach().sum() * scale / total)
        weights = per_group[group_ids] + overall
        if scale != 1:
            weights = weights * scale
        return torch.dot(per_sample_loss, weights.to(per_sample_loss.dtype)) + constant

    @property
    def dual_steps(self) -> int:
        """Dual updates taken so far in which at least one estimate was ready (reads the device counter)."""
        return int(self.dual_step_count)

    def multipliers_tensor(self) -> torch.Tensor:
        """Current λ, `[G]` (a detached copy)."""
        return self.multiplier.weight.detach().flatten().clone()


class ExcessAccuracyGapProblem(GroupConstrainedProblem):
    """CEAG: ψ_g ≤ ε for every group (inequality, λ_g ≥ 0).

    The primal step sees the proxy ψ̃_g = (L_g − L_g^dense) − (L − L^dense). By default its overall term
    L − L^dense is held constant (no gradient), so the primal Lagrangian is L + Σ_g λ_g L_g + const: a
    positively weighted sum of group losses, bounded below. With `overall_gradient=True` (the paper's code)
    the gradient is (1 − Σ_g λ_g) ∇L + Σ_g λ_g ∇L_g: once the multipliers of the groups in a batch sum past 1,
    the coefficient of every group whose λ_g is small turns negative, and the step *raises* their loss — the
    cross-entropy is unbounded above, so training can collapse. It does when the constraints are out of reach
    (99 % sparsity on the raw digits: the multipliers summed to 2–3 within two epochs, and CEAG's training loss
    rose while NFT's fell; BENCHMARKS.md compares both proxies). The dual step is the same either way: it uses
    the true gaps ψ̂_g.
    """

    constraint_type = ConstraintType.INEQUALITY
    observed_quantity = "correct"

    def __init__(
        self,
        reference: DenseReference,
        buffer_size: int,
        tolerance: float,
        device: torch.device | str = "cpu",
        overall_gradient: bool = False,
        estimate_reference: DenseReference | None = None,
    ) -> None:
        if not math.isfinite(tolerance):
            raise ValueError(f"tolerance must be a finite accuracy fraction (e.g. 0.01), got {tolerance}.")
        # A negative bound is a training margin below a tolerance of 0: ψ_g ≤ ε − δ is still one-sided.
        self.tolerance = tolerance
        self.overall_gradient = overall_gradient
        super().__init__(reference, buffer_size, device, estimate_reference)

    def estimated_gaps(self) -> torch.Tensor:
        """ψ̂_g from the estimates (0 for groups not yet observed)."""
        return buffer_excess_gaps(
            self.estimate_reference["group_accuracy"], self.group_estimate, self.estimate_weights, self.observed
        )

    @property
    def violation_offset(self) -> float:
        return self.tolerance


class EqualizedLossProblem(GroupConstrainedProblem):
    """EL / EL+RB: L_g − L = 0 for every group (equality, λ_g of either sign)."""

    constraint_type = ConstraintType.EQUALITY
    observed_quantity = "loss"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # L_g − L: no reference losses
        self.surrogate_group_reference = torch.zeros_like(self.surrogate_group_reference)
        self.surrogate_reference = torch.zeros_like(self.surrogate_reference)

    def estimated_gaps(self) -> torch.Tensor:
        """Estimated L_g − L per group (0 for groups not yet observed)."""
        overall = weighted_mean(self.group_estimate, self.estimate_weights, self.observed)
        return torch.where(self.observed, self.group_estimate - overall, torch.zeros_like(self.group_estimate))
