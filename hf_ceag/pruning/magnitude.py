"""Unstructured magnitude pruning: one boolean mask per prunable weight, nested across prunings.

Masks are enforced twice:

* on the gradients, before anything reads them: before gradient accumulation, DDP's all-reduce, the fp16
  loss scaler's unscaling, the Trainer's gradient clipping and its logged `grad_norm`. `CEAGTrainer` masks
  them all in one fused call after each backward pass (`MagnitudePruner.mask_gradients`); used on its own,
  the pruner puts a tensor hook on every prunable weight instead. (Masking in an optimizer pre-step hook
  comes too late: the Trainer clips before `optimizer.step()`, and the pruned weights' gradients would
  inflate the clipping norm.)
* on the weights. Torch's SGD, Adam and AdamW keep a zero weight exactly zero when its gradient and its first
  moment (SGD's momentum buffer, Adam's `exp_avg`) are zero: every term of their update is then a product
  with zero (weight decay included, L2 or decoupled). For these the pruner zeroes the pruned entries of those
  state tensors whenever the masks change or the optimizer's state is loaded (a resume), and the step needs
  no mask pass of its own. Any other optimizer gets an optimizer post-step hook that zeroes the pruned
  weights after every step, whatever it does with its state.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

PRUNABLE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SPARSE_PARENT_WARNING = 0.5  # a parent with more exact zeros than this in its prunable layers is warned about
# Optimizers (exact types: a subclass may change the update) under which a weight whose gradient and first
# moment are zero stays exactly zero, and the state tensors that hold that moment.
ZERO_PRESERVING_STATE = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg",),
    torch.optim.AdamW: ("exp_avg",),
}


def prunable_parameters(model: nn.Module, keep_first_last_dense: bool) -> dict[str, nn.Parameter]:
    """Weights of the conv and linear layers, by name; without the first conv and last linear if asked."""
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)]
    if keep_first_last_dense:
        convs = [name for name, m in modules if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        linears = [name for name, m in modules if isinstance(m, nn.Linear)]
        dense = {convs[0]} if convs else set()
        dense |= {linears[-1]} if linears else set()
        modules = [(name, m) for name, m in modules if name not in dense]
    return {f"{name}.weight" if name else "weight": m.weight for name, m in modules if m.weight.requires_grad}


def sparsity_definition(keep_first_last_dense: bool, num_layers: int) -> str:
    """What `sparsity` means in reports and cards (the trainer's and the audit's alike): the weights it counts."""
    layers = "conv and linear weights" + (
        " except the first conv and the last linear layer" if keep_first_last_dense else ""
    )
    return f"fraction of exactly zero weights over the {num_layers} {layers} (the layers hf-ceag prunes)"


@torch.no_grad()
def measured_sparsity(parameters: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros over `parameters` (e.g. `prunable_parameters(model, True)`), and per weight.

    The zeros are counted on the weights' device and read back in one transfer (the trainer logs this every
    `logging_steps`; a read per weight would be a host-device synchronisation per weight)."""
    if not parameters:
        raise ValueError("measured_sparsity: no weights given (the model has no prunable layers).")
    device = next(iter(parameters.values())).device
    counts = torch.stack([(p == 0).sum().to(device) for p in parameters.values()]).tolist()
    sizes = [p.numel() for p in parameters.values()]
    per_weight = {name: zeros / size for name, zeros, size in zip(parameters, counts, sizes)}
    return sum(counts) / sum(sizes), per_weight


def dense_parent_sparsity(parameters: dict[str, torch.Tensor], warn_above: float = SPARSE_PARENT_WARNING) -> float:
    """`measured_sparsity` of the model handed over as the dense parent, before anything prunes it, with a
    `UserWarning` above `warn_above`: ψ_g compares the pruned model with its parent as "dense", so from an
    already-sparse parent it measures only what the further pruning cost."""
    sparsity = measured_sparsity(parameters)[0]
    if sparsity > warn_above:
        warnings.warn(
            f"The model to prune is already {100 * sparsity:.1f} % sparse (exact zeros in its prunable layers), "
            "not a dense model: the report and the model card compare the pruned model with it as the dense "
            "parent, so they show only what the further pruning cost. Pass the dense model (before any pruning) "
            "to measure the disparate impact of pruning.",
            UserWarning,
            stacklevel=3,
        )
    return sparsity


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    # Exactly k indices (ties broken by position), so the sparsity is exactly what was asked.
    return torch.topk(scores, k, largest=False, sorted=False).indices


class MagnitudePruner:
    """Holds one boolean mask per prunable weight (True = kept) and enforces it.

    `scope="layerwise"` prunes every layer to the same fraction; `scope="global"` ranks all weights together.
    Pruned weights get no gradient: with `gradient_hooks=True` a tensor hook per weight masks each gradient as
    autograd produces it; with False the caller masks them all in one fused call, `mask_gradients()`, after
    each backward pass and before anything reads them (clipping, the optimizer) — what `CEAGTrainer` does.
    Once pruning starts, each mask is also kept in its weight's dtype (as `torch.nn.utils.prune` keeps its
    `weight_mask`): multiplying by it is one fused call, where a boolean factor takes a slow casting path.
    """

    def __init__(
        self,
        parameters: dict[str, nn.Parameter],
        scope: Literal["layerwise", "global"],
        gradient_hooks: bool = True,
    ) -> None:
        if not parameters:
            raise ValueError(
                "The model has no prunable layers (Conv or Linear weights) left to prune. "
                "Use a model with conv/linear layers, or set keep_first_last_dense=False if the only ones "
                "are the first conv and the last linear layer."
            )
        if scope not in ("layerwise", "global"):
            raise ValueError(f"pruning_scope must be 'layerwise' or 'global', got {scope!r}.")
        self.parameters = parameters
        self.scope = scope
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in parameters.items()}
        self._pruned = False  # until the first pruning, every mask is all True and the gradient hooks idle
        self._factors: list[torch.Tensor] = []  # the masks in their weights' dtypes, once pruned
        self._hooked: set[int] = set()
        self._zero_preserving: list[torch.optim.Optimizer] = []  # attached; their pruned state kept at zero
        if gradient_hooks:
            for name, p in parameters.items():
                p.register_hook(self._gradient_mask(name))

    def _gradient_mask(self, name: str):
        # Looks the mask up at call time: pruning replaces the mask tensors.
        def mask(grad: torch.Tensor) -> torch.Tensor | None:
            return grad * self.masks[name] if self._pruned else None

        return mask

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Recompute the masks so that exactly round(sparsity · n) weights are zero (per layer or overall).

        Already-pruned weights rank below every kept weight, so masks only ever grow sparser.
        """
        scores = {
            name: torch.where(
                self.masks[name], p.detach().abs().float(), torch.full_like(p, -1.0, dtype=torch.float)
            )
            for name, p in self.parameters.items()
        }
        if self.scope == "layerwise":
            for name, score in scores.items():
                k = round(sparsity * score.numel())
                mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
                mask[_smallest(score.flatten(), k)] = False
                self.masks[name] = mask.view_as(score)
        else:
            flat = torch.cat([s.flatten() for s in scores.values()])
            keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
            keep[_smallest(flat, round(sparsity * flat.numel()))] = False
            for name, chunk in zip(scores, keep.split([s.numel() for s in scores.values()])):
                self.masks[name] = chunk.view_as(scores[name])
        self._masks_changed(pruned=True)

    def _masks_changed(self, pruned: bool) -> None:
        self._pruned = pruned
        self._factors = [self.masks[name].to(p.dtype) for name, p in self.parameters.items()] if pruned else []
        self.apply_masks()
        for optimizer in self._zero_preserving:
            self.mask_optimizer_state(optimizer)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights in place (nothing to do before pruning)."""
        if self._pruned:
            torch._foreach_mul_(list(self.parameters.values()), self._factors)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the pruned weights' gradients in place, in one fused call (nothing to do before pruning)."""
        if not self._pruned:
            return
        pairs = [
            (p.grad, factor) for p, factor in zip(self.parameters.values(), self._factors) if p.grad is not None
        ]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), list(factors))

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the pruned entries of the first-moment state (`ZERO_PRESERVING_STATE`) of `optimizer`, in one
        fused call; state not created yet (before the first step) needs nothing."""
        if not self._pruned:
            return
        tensors, factors = [], []
        for p, factor in zip(self.parameters.values(), self._factors):
            state = optimizer.state.get(p, {})
            for key in ZERO_PRESERVING_STATE.get(type(optimizer), ()):
                if isinstance(state.get(key), torch.Tensor):
                    tensors.append(state[key])
                    factors.append(factor.to(state[key].dtype))
        if tensors:
            torch._foreach_mul_(tensors, factors)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the pruned weights exactly zero through every `optimizer.step()` (idempotent). Their gradients
        are already zero (the tensor hooks, or `mask_gradients()`). Under SGD, Adam or AdamW it is enough that
        their first moments are zero too: zeroed now, whenever the masks change, and after any
        `load_state_dict` of the optimizer (a resume from a checkpoint written by another version). Any other
        optimizer gets a post-step hook that zeroes the pruned weights after each step (one more pass over
        them every step)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if id(optimizer) in self._hooked:
            return
        if type(optimizer) in ZERO_PRESERVING_STATE:
            self._zero_preserving.append(optimizer)
            optimizer.register_load_state_dict_post_hook(self.mask_optimizer_state)
            self.mask_optimizer_state(optimizer)
            self.apply_masks()
        else:
            optimizer.register_step_post_hook(lambda *_: self.apply_masks())
        self._hooked.add(id(optimizer))

    @torch.no_grad()
    def sparsity(self) -> float:
        """Measured fraction of exact zeros among the prunable weights (`sparsity_definition`)."""
        return measured_sparsity(self.parameters)[0]

    @torch.no_grad()
    def layer_sparsity(self) -> dict[str, float]:
        """Measured fraction of exact zeros per prunable weight."""
        return measured_sparsity(self.parameters)[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.clone() for name, mask in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.masks) - set(state)
        if missing:
            raise ValueError(f"Pruning masks missing for {sorted(missing)}: the checkpoint is for another model.")
        for name in self.masks:
            self.masks[name] = state[name].to(self.masks[name].device, torch.bool)
        self._masks_changed(pruned=not all(bool(mask.all()) for mask in self.masks.values()))
