"""A run stopped part-way, as a killed process stops (its checkpoints stay), beside the same run uninterrupted:
what the resume tests compare bit for bit."""

import copy

from transformers import TrainerCallback

from hf_ceag import CEAGTrainer


class StopAt(TrainerCallback):
    """Ends training after optimizer step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def straight_and_stopped(dense, make_config, train, folder, stop, save_steps, **common):
    """(the run uninterrupted, the same run stopped after step `stop` with checkpoints every `save_steps` in
    `folder`), each from its own copy of `dense`, `common` the settings both share."""
    straight = CEAGTrainer(copy.deepcopy(dense), make_config(**common), train_dataset=train)
    straight.train()
    config = make_config(output_dir=folder, save_strategy="steps", save_steps=save_steps, **common)
    stopped = CEAGTrainer(copy.deepcopy(dense), config, train_dataset=train, callbacks=[StopAt(stop)])
    stopped.train()
    return straight, stopped
