"""Checks that need a CUDA device (skipped without one): a training step, and the fetch of its batch, that never
synchronise with the host (the per-step non-finite watch included), and a real fp16 run whose loss scaler skips
a step, with that step's dual update undone."""

import pytest
import torch
from transformers import TrainerCallback

from hf_ceag import CEAGTrainer
from hf_ceag.constraints.step import dual_state_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class SyncDebugDuringSteps(TrainerCallback):
    """Turns `torch.cuda.set_sync_debug_mode("error")` on from `on_step_begin` to `on_step_end` of every step
    after the first log (forward, loss, dual step, backward, clipping, optimizer step and mask hooks; the
    batch is fetched and moved before `on_step_begin`, logging happens after `on_step_end`)."""

    def __init__(self):
        self.checked = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= args.logging_steps:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            self.checked += 1

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.set_sync_debug_mode("default")


def watch_batch_fetches(trainer) -> list[int]:
    """The same check around each batch fetch after the first log (the Trainer's prefetch, accelerate's copy to
    the device, the step's group counts): with `CEAGConfig`'s non-blocking copies from pinned memory, nothing
    there waits for the device either. Returns the list of steps whose fetch was checked."""
    fetch, checked = trainer.get_batch_samples, []

    def get_batch_samples(*args, **kwargs):
        if trainer.state.global_step < trainer.args.logging_steps:
            return fetch(*args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fetch(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(trainer.state.global_step)

    trainer.get_batch_samples = get_batch_samples
    return checked


@pytest.mark.parametrize("mitigation", ["ceag", "none", "equalized_loss", "ceag+nupi"])
def test_training_steps_never_synchronise_with_the_host(tiny_model, digits, make_config, mitigation):
    watcher = SyncDebugDuringSteps()
    mitigation, _, dual = mitigation.partition("+")
    nupi = {"dual_optimizer": "nupi", "nupi_kp": 2.0} if dual else {}
    config = make_config(
        mitigation=mitigation, max_steps=24, logging_steps=6, pruning_end_epoch=0.0, pruning_start_epoch=0.0,
        dual_lr=0.5, tolerance=0.0, **nupi,
    )  # fmt: skip
    assert config.dataloader_pin_memory and config.accelerator_config.non_blocking
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"], callbacks=[watcher])
    assert trainer.accelerator.dataloader_config.non_blocking
    fetches = watch_batch_fetches(trainer)
    try:
        trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watcher.checked == 24 - 6 and fetches == list(range(6, 24))
    if mitigation == "none":
        assert trainer.problem.dual_steps == 0
    else:
        assert 0 < trainer.problem.dual_steps <= 24 and trainer.problem.multipliers_tensor().abs().sum() > 0
    assert any("max_excess_gap_window" in entry for entry in trainer.state.log_history)


class SkipOneStep(TrainerCallback):
    """Blows up the fp16 loss scale for step `step` only, so that its scaled gradients overflow and the scaler
    skips that optimizer step; records the multipliers and the dual-step count around it."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step
        self.skipped_steps, self.before, self.after, self.scale = [], None, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            scale = self.trainer.accelerator.scaler._scale
            self.scale = scale.item()
            scale.fill_(2.0**60)
            self.before = self.snapshot()

    def snapshot(self):
        optimizer_state = [t.clone() for t in dual_state_tensors(self.trainer.dual_optimizer)]
        return self.trainer.problem.multipliers_tensor(), self.trainer.problem.dual_steps, optimizer_state

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.accelerator.optimizer_step_was_skipped:
            self.skipped_steps.append(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step + 1:
            self.after = self.snapshot()
            self.trainer.accelerator.scaler._scale.fill_(self.scale)


@pytest.mark.parametrize("dual", [{}, {"dual_optimizer": "nupi", "nupi_kp": 2.0}], ids=["sgd", "nupi"])
def test_fp16_step_skipped_by_the_loss_scaler_undoes_its_dual_step(tiny_model, digits, make_config, dual):
    config = make_config(
        mitigation="ceag", fp16=True, max_steps=12, pruning_end_epoch=0.0, dual_lr=0.5, tolerance=0.0, **dual
    )
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    watcher = SkipOneStep(trainer, step=6)
    trainer.callback_handler.callbacks.insert(0, watcher)  # before CEAGTrainer's own callbacks
    trainer.train()
    assert 6 in watcher.skipped_steps, watcher.skipped_steps
    assert torch.equal(watcher.before[0], watcher.after[0])  # the skipped step's dual update was undone ...
    assert watcher.before[1] == watcher.after[1]  # ... and not counted
    assert all(torch.equal(a, b) for a, b in zip(watcher.before[2], watcher.after[2]))  # nuPI's ξ too
    assert len(watcher.before[2]) == (1 if dual else 0)
    assert trainer.problem.multipliers_tensor().sum() > 0  # the other steps did move λ
    print(f"skipped steps {watcher.skipped_steps}, dual steps {trainer.problem.dual_steps}")


def test_the_non_finite_watch_records_a_step_without_synchronising():
    """`NonFiniteWatch.observe`, which `CEAGTrainer.training_step` calls every micro-batch, stays on the device
    for a finite and a non-finite loss alike; only `read` (at logs and saves) waits for it."""
    from hf_ceag.callbacks import NonFiniteWatch

    watch, weights = NonFiniteWatch(), {"w": torch.ones(3, device="cuda")}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, value in [(1, 0.5), (2, float("nan")), (3, float("inf")), (4, 0.25)]:
            watch.observe(torch.full((), value, device="cuda"), step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.read(weights) == (2, [])
    weights["w"][1] = float("inf")
    assert watch.read(weights) == (2, ["w"])
