"""Guards against a broken (non-finite) model: nothing broken is trained on in silence, or saved.

* `NonFiniteGuard`, a callback for any `transformers.Trainer`, reads the losses the Trainer logs.
* `NonFiniteWatch`, what `CEAGTrainer` uses: it records every step's loss on the device (no read back to the host
  during a step) and is read where the Trainer reads anyway: at each log, before each save, and at the end of
  training; a read also checks the weights themselves, in one fused pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import TrainerCallback

FIXES = (
    "Lower learning_rate, check the input data for NaN or infinite values, keep max_grad_norm > 0 (gradient "
    "clipping), or train in fp32 (without bf16/fp16)."
)


def _non_finite_logs(logs: dict | None, fp16: bool) -> dict[str, float]:
    # Under fp16 the loss scaler skips the steps whose gradients overflow, so only the losses count.
    keys = ("loss", "ce_loss") if fp16 else ("loss", "ce_loss", "grad_norm")
    return {k: logs[k] for k in keys if isinstance((logs or {}).get(k), float) and not math.isfinite(logs[k])}


class NonFiniteGuard(TrainerCallback):
    """Stops training with a clear error when a logged loss or gradient norm is not finite, before anything is
    saved: a broken model must not be published. Read at logging steps only, where the values are already on
    the host. Under fp16 the loss scaler skips the steps whose gradients overflow, so only the losses count.
    (The Trainer replaces a non-finite `loss` by the running mean unless `logging_nan_inf_filter=False`;
    `CEAGTrainer` also logs `ce_loss` unfiltered, and checks every step with `NonFiniteWatch`.)"""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = _non_finite_logs(logs, args.fp16)
        if bad:
            raise FloatingPointError(
                f"Training stopped: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step "
                f"{state.global_step} (epoch {state.epoch or 0:.2f}); the model is broken and was not saved. Lower "
                "learning_rate, keep max_grad_norm > 0, or train in fp32 (without bf16/fp16) on this machine."
            )


def floating_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point parameters and buffers (BatchNorm's running statistics too), by name: what
    a saved model holds."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t for name, t in named.items() if t.is_floating_point() and t.numel() > 0}


class NonFiniteWatch:
    """The first optimizer step whose training loss was not finite, kept on the device.

    `observe` runs every micro-batch: one comparison on the loss's device, nothing read back (a training step
    never waits for the device). `check` reads it, with a check that every weight and buffer is finite (one
    fused ∞-norm per tensor: NaN and ±inf propagate, and it cannot overflow), and raises `FloatingPointError`:
    the trainer calls it at each log, before each save and at the end of training, so a model that went NaN
    is neither trained on in silence nor written. Only the loss is watched each step, not the gradients: under
    fp16 the loss scaler legitimately skips steps whose gradients overflow, and a non-finite gradient that
    is applied shows in the weights, which `check` reads."""

    NEVER = 2**62  # the step recorded while every loss was finite

    def __init__(self) -> None:
        self.first_bad_step: torch.Tensor | None = None  # 0-d int64 on the loss's device

    @torch.no_grad()
    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record `step` (1-based optimizer step) if `loss` is not finite; stays on the device."""
        bad_step = torch.where(torch.isfinite(loss.detach()).all(), self.NEVER, step)
        if self.first_bad_step is None:
            self.first_bad_step = bad_step
        else:
            torch.minimum(self.first_bad_step, bad_step, out=self.first_bad_step)

    @torch.no_grad()
    def read(
        self, tensors: dict[str, torch.Tensor], gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[int | None, list[str]]:
        """The first step with a non-finite loss (None if none; the earliest over the processes `gather`
        brings together) and the names of the `tensors` holding a NaN or an infinity: one read."""
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        first = self.first_bad_step if self.first_bad_step is not None else torch.tensor(self.NEVER)
        first = first.to(device).reshape(1)
        if gather is not None:
            first = gather(first).min().reshape(1)
        norms = torch._foreach_norm(list(tensors.values()), float("inf")) if tensors else []
        flags = [(~torch.isfinite(n)).to(device=device, dtype=torch.long).reshape(1) for n in norms]
        values = torch.cat([first, *flags]).tolist()  # the one read from the device
        bad = [name for name, flag in zip(tensors, values[1:]) if flag]
        return (values[0] if values[0] < self.NEVER else None), bad

    def check(
        self,
        tensors: dict[str, torch.Tensor],
        action: str,
        logs: dict | None = None,
        fp16: bool = False,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Raise `FloatingPointError` (naming the first bad step, the non-finite weights and the fixes) if a
        loss since training began or one of `tensors` (`floating_state(model)`) is not finite. `action` says
        what is refused (e.g. "Training stopped at step 12"); `logs` adds the non-finite values being logged."""
        first, bad = self.read(tensors, gather)
        if first is None and not bad:
            return
        problems = []
        if first is not None:
            logged = _non_finite_logs(logs, fp16)
            shown = f" (logged: {', '.join(f'{k}={v}' for k, v in logged.items())})" if logged else ""
            problems.append(f"non-finite training loss from step {first} on{shown}")
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            problems.append(f"NaN or infinite values in {len(bad)} weight tensor(s): {', '.join(bad[:3])}{more}")
        raise FloatingPointError(
            f"{action}: {'; '.join(problems)}. The model is broken and was not saved. {FIXES}"
        )
