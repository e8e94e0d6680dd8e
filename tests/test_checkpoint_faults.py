"""A run never resumes from a checkpoint a crash or a full disk cut short, says which files of a damaged one it
cannot read, and writes its constrained state whole or not at all."""

import copy
import errno
import json
import os
import shutil

import pytest
import torch
from interruptions import StopAt, straight_and_stopped

from hf_ceag import CEAGConfig, CEAGTrainer, build_classifier
from hf_ceag.constraints import state as state_module
from hf_ceag.constraints.state import STATE_JSON, STATE_TENSORS, ConstrainedState

# a run to resume: constrained from step 7 (pruning ends at 0.2 of 36 steps per epoch) to step 16
COMMON = {
    "mitigation": "ceag", "dual_lr": 0.5, "tolerance": 0.0, "max_steps": 16, "pruning_end_epoch": 0.2,
    "use_cpu": True,
}  # fmt: skip


def _truncate(path, keep=0.5):
    with open(path, "rb+") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _killed_before_the_trainer_files(folder):
    # the constrained state is written first: a process killed after it leaves no model, optimizer or state
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        os.remove(os.path.join(folder, name))


def _disk_full_in_the_optimizer(folder):
    _truncate(os.path.join(folder, "optimizer.pt"))
    for name in ("scheduler.pt", "rng_state.pth", "trainer_state.json"):
        os.remove(os.path.join(folder, name))


def _disk_full_in_the_weights_and_constrained_state(folder):
    _truncate(os.path.join(folder, "model.safetensors"))
    _truncate(os.path.join(folder, STATE_TENSORS), keep=0.9)
    os.remove(os.path.join(folder, STATE_JSON))


PARTIAL = [
    _killed_before_the_trainer_files,
    _disk_full_in_the_optimizer,
    _disk_full_in_the_weights_and_constrained_state,
]


@pytest.fixture
def interrupted(tmp_path, tiny_model, digits, make_config):
    """An uninterrupted run, the output folder of the same run stopped at step 10 (whole checkpoints at steps 5
    and 10), and the dense model both started from."""
    dense = copy.deepcopy(tiny_model)
    folder = str(tmp_path / "resumable")
    straight, first = straight_and_stopped(dense, make_config, digits["train"], folder, 10, 5, **COMMON)
    assert first.state.global_step == 10
    assert sorted(p for p in os.listdir(folder) if p.startswith("checkpoint")) == ["checkpoint-10", "checkpoint-5"]
    return straight, folder, dense


@pytest.mark.parametrize("damage", PARTIAL, ids=[d.__name__[1:] for d in PARTIAL])
def test_a_partial_checkpoint_is_passed_over_and_the_run_ends_bit_identical(
    interrupted, digits, make_config, damage
):
    """A process killed (or a disk filled) while writing checkpoint-15 leaves a partial folder, the newest by its
    name; resume_from_checkpoint=True resumes from checkpoint-10 instead, says so, and ends exactly where the
    uninterrupted run does (weights, masks, multipliers, buffers)."""
    straight, folder, dense = interrupted
    partial = os.path.join(folder, "checkpoint-15")
    shutil.copytree(os.path.join(folder, "checkpoint-10"), partial)
    damage(partial)
    resumed = CEAGTrainer(
        copy.deepcopy(dense), make_config(output_dir=folder, **COMMON), train_dataset=digits["train"]
    )
    with pytest.warns(UserWarning, match=r"passing over the incomplete checkpoint-15 \(.*\).*from checkpoint-10"):
        resumed.train(resume_from_checkpoint=True)

    assert resumed.state.global_step == straight.state.global_step == 16
    assert straight.problem.multipliers_tensor().abs().sum() > 0
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    for name, mask in straight.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name]), name
    assert torch.equal(straight.problem.multipliers_tensor(), resumed.problem.multipliers_tensor())
    assert torch.equal(straight.problem.buffer.values, resumed.problem.buffer.values)


def test_an_incomplete_checkpoint_is_refused_naming_its_files_and_the_last_complete_one(
    interrupted, digits, make_config
):
    _, folder, dense = interrupted
    partial = os.path.join(folder, "checkpoint-15")
    shutil.copytree(os.path.join(folder, "checkpoint-10"), partial)
    _disk_full_in_the_weights_and_constrained_state(partial)

    def trainer():
        return CEAGTrainer(
            copy.deepcopy(dense), make_config(output_dir=folder, **COMMON), train_dataset=digits["train"]
        )

    with pytest.raises(ValueError) as error:
        trainer().train(resume_from_checkpoint=partial)
    for words in ("checkpoint-15", "is incomplete", "model.safetensors (cut short or damaged)",
                  f"{STATE_JSON} (missing)", f"{STATE_TENSORS} (cut short or damaged)",
                  "last complete checkpoint beside it is " + os.path.join(folder, "checkpoint-10"),
                  "resume from an earlier checkpoint"):  # fmt: skip
        assert words in str(error.value), (words, str(error.value))

    for step in (5, 10):  # no checkpoint is whole: nothing to resume from, said before any work
        os.remove(os.path.join(folder, f"checkpoint-{step}", "trainer_state.json"))
    refused = trainer()
    with pytest.raises(
        ValueError, match=r"no complete checkpoint in output_dir=.*checkpoint-15 .*checkpoint-5 \("
    ):
        refused.train(resume_from_checkpoint=True)
    assert not refused.dense_correct  # refused before the dense pass


def test_the_time_spent_pruning_survives_a_resume(tmp_path, tiny_model, digits, make_config):
    """`pruning_seconds` (report.json) counts the pruning done before the checkpoint too."""
    common = {**COMMON, "max_steps": 8, "pruning_end_epoch": 0.1}  # pruning ends at step 4
    config = make_config(save_strategy="steps", save_steps=6, **common)
    first = CEAGTrainer(copy.deepcopy(tiny_model), config, train_dataset=digits["train"], callbacks=[StopAt(6)])
    first.train()
    assert first.pruning_seconds > 0
    resumed = CEAGTrainer(tiny_model, make_config(**common), train_dataset=digits["train"])
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8 and resumed.pruning_seconds == first.pruning_seconds


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits):
    """A whole CEAGTrainer checkpoint (3 steps of CEAG) and the config that wrote it."""
    from transformers import set_seed

    set_seed(0)
    model = build_classifier("test_resnet", num_labels=10, channels=1)
    config = CEAGConfig(
        output_dir=str(tmp_path_factory.mktemp("run")), max_steps=3, per_device_train_batch_size=32,
        per_device_eval_batch_size=256, learning_rate=0.01, optim="sgd", pruning_end_epoch=0.02,
        target_sparsity=0.8, buffer_size=4, mitigation="ceag", save_strategy="steps", save_steps=3,
        report_to="none", disable_tqdm=True, use_cpu=True, allow_weak_dense_model=True,
    )  # fmt: skip
    CEAGTrainer(model, config, train_dataset=digits["train"]).train()
    return os.path.join(config.output_dir, "checkpoint-3"), config


def _cut_short_tensors(folder):
    _truncate(os.path.join(folder, STATE_TENSORS))
    return STATE_TENSORS


def _invalid_json(folder):
    with open(os.path.join(folder, STATE_JSON), "w") as f:
        f.write('{"format_version": 1, "mitigation": "ce')
    return STATE_JSON


def _json_without_the_reference(folder):
    path = os.path.join(folder, STATE_JSON)
    with open(path) as f:
        meta = json.load(f)
    del meta["reference"]
    with open(path, "w") as f:
        json.dump(meta, f)
    return STATE_JSON


CORRUPT = [_cut_short_tensors, _invalid_json, _json_without_the_reference]


@pytest.mark.parametrize("corrupt", CORRUPT, ids=[c.__name__[1:] for c in CORRUPT])
def test_a_damaged_constrained_state_is_refused_naming_the_file_and_the_fix(tmp_path, checkpoint, digits, corrupt):
    folder, config = checkpoint
    damaged = str(tmp_path / "checkpoint-3")
    shutil.copytree(folder, damaged)
    name = corrupt(damaged)
    with pytest.raises(ValueError) as error:
        ConstrainedState.load(damaged)
    message = str(error.value)
    assert os.path.join(damaged, name) in message, message
    assert "Resume from an earlier checkpoint, or start a new run" in message, message

    model = build_classifier("test_resnet", num_labels=10, channels=1)
    trainer = CEAGTrainer(model, config, train_dataset=digits["train"])
    with pytest.raises(ValueError) as error:
        trainer.train(resume_from_checkpoint=damaged)
    assert name in str(error.value) and "earlier checkpoint" in str(error.value), str(error.value)
    assert trainer.state.global_step == 0


def _full_disk_in_json(monkeypatch):
    def dump(obj, f, **kwargs):
        f.write('{"format_version": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module.json, "dump", dump)
    return STATE_JSON


def _full_disk_in_tensors(monkeypatch):
    def save_file(tensors, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x10\x00\x00\x00")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module, "save_file", save_file)
    return STATE_TENSORS


FULL_DISK = [_full_disk_in_json, _full_disk_in_tensors]


@pytest.mark.parametrize("fail", FULL_DISK, ids=[f.__name__[1:] for f in FULL_DISK])
def test_a_failed_save_leaves_the_previous_constrained_state_whole(tmp_path, checkpoint, monkeypatch, fail):
    folder, _ = checkpoint
    target = tmp_path / "checkpoint"
    shutil.copytree(folder, target)
    before = {name: (target / name).read_bytes() for name in (STATE_TENSORS, STATE_JSON)}
    state = ConstrainedState.load(str(target))
    name = fail(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        state.save(str(target))
    assert (target / name).read_bytes() == before[name]  # the file a reader finds is the whole earlier one
    assert not [p for p in os.listdir(target) if ".tmp" in p]  # nor is a half-written temporary left behind
    monkeypatch.undo()
    ConstrainedState.load(str(target))
