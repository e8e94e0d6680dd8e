"""Trainer callbacks of hf-ceag that work with any `transformers.Trainer`."""

from __future__ import annotations

import math

from transformers import TrainerCallback


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
