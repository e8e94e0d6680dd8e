"""Checkpoint folders and the output folder: which checkpoint a run resumes from, whether a checkpoint is whole,
and whether the output folder can be written at all.

A process killed while writing `checkpoint-N`, or a disk that filled there, leaves a folder with some files
missing or cut short. `transformers.trainer_utils.get_last_checkpoint` picks the newest folder by its name alone;
`resume_checkpoint` instead resumes from the newest *complete* one, and says so. Files are checked without
reading them whole: a safetensors header against the file's size, a JSON file by parsing it, a `torch.save` file
by its zip directory (written last, so a cut-short file has none).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import warnings
import zipfile

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .constraints.state import STATE_JSON, STATE_TENSORS

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
# the model's weights, in any of the layouts `Trainer._load_from_checkpoint` reads
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_FIX = "resume from an earlier checkpoint, or start a new run without resume_from_checkpoint"


def checkpoint_problems(folder: str, save_only_model: bool = False) -> list[str]:
    """What keeps `folder` from being resumed exactly: each missing or damaged file, as `"<file> (missing)"` or
    `"<file> (cut short or damaged)"`; empty for a whole checkpoint. A whole one holds the model's weights,
    `trainer_state.json`, the constrained state (`ceag_state.safetensors`, `ceag_state.json`) and, unless
    `save_only_model`, the optimizer, the scheduler and the random-number state (without them the Trainer
    resumes silently from a fresh optimizer, which is not the run that was saved)."""
    if not os.path.isdir(folder):
        return [f"{folder} (missing)"]
    names = set(os.listdir(folder))
    problems = [_problem(folder, name) for name in (TRAINER_STATE, STATE_TENSORS, STATE_JSON)]
    weights = [name for name in WEIGHTS if name in names]
    problems += [_problem(folder, name) for name in weights] if weights else [f"{WEIGHTS[0]} (missing)"]
    if not save_only_model:
        problems += [_problem(folder, name) for name in (OPTIMIZER, SCHEDULER) if name in names]
        # sharded (FSDP) and DeepSpeed optimizers are saved under other names, in folders
        if not any(name.startswith(("optimizer", "global_step")) for name in names):
            problems.append(f"{OPTIMIZER} (missing)")
        if SCHEDULER not in names:
            problems.append(f"{SCHEDULER} (missing)")
        rng = sorted(name for name in names if re.fullmatch(r"rng_state(_\d+)?\.pth", name))
        problems += [_problem(folder, name) for name in rng] if rng else ["rng_state.pth (missing)"]
    return [p for p in problems if p]


def _problem(folder: str, name: str) -> str | None:
    # None for a whole file; else why it cannot be read back
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{name} (missing)"
    try:
        whole = _whole(path)
    except (OSError, ValueError):  # unreadable, or a JSON/safetensors header that does not parse
        whole = False
    return None if whole else f"{name} (cut short or damaged)"


def _whole(path: str) -> bool:
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    if path.endswith(".safetensors"):
        return _whole_safetensors(path)
    if path.endswith((".pt", ".pth", ".bin")):
        return zipfile.is_zipfile(path)
    return os.path.getsize(path) > 0


def _whole_safetensors(path: str) -> bool:
    # layout: 8-byte little-endian header length, JSON header, then the tensors' bytes up to the last end offset
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return False
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            return False
        header = json.loads(f.read(length))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + length + max(ends, default=0) == size


def checkpoints_newest_first(output_dir: str) -> list[str]:
    """The `checkpoint-<step>` folders of `output_dir`, the highest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT_NAME.match(name))]
    folders = [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]
    return [folder for folder in folders if os.path.isdir(folder)]


def last_complete_checkpoint(output_dir: str, save_only_model: bool = False) -> str | None:
    """The checkpoint of `output_dir` with the highest step among the whole ones (`checkpoint_problems`)."""
    return next(
        (c for c in checkpoints_newest_first(output_dir) if not checkpoint_problems(c, save_only_model)), None
    )


def resume_checkpoint(
    resume_from_checkpoint: str | bool | None, output_dir: str, save_only_model: bool = False
) -> str | None:
    """The checkpoint folder `Trainer.train(resume_from_checkpoint=...)` should resume from, or None for none.

    `True`: the newest whole checkpoint of `output_dir`; newer ones that are incomplete (a run killed while
    saving, a full disk) are passed over with a `UserWarning` naming both. A path: that checkpoint, refused
    with a `ValueError` naming its missing or damaged files and the last whole checkpoint beside it."""
    if resume_from_checkpoint is True:
        return _newest_whole(output_dir, save_only_model)
    if not resume_from_checkpoint:
        return None
    if not os.path.isdir(resume_from_checkpoint):
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r}: folder not found. Give a checkpoint-<step> folder, "
            "or True for the newest complete checkpoint in output_dir."
        )
    problems = checkpoint_problems(resume_from_checkpoint, save_only_model)
    if problems:
        parent = os.path.dirname(os.path.normpath(resume_from_checkpoint))
        last = last_complete_checkpoint(parent, save_only_model)
        fallback = (
            f"The last complete checkpoint beside it is {last}" if last else "No checkpoint beside it is complete"
        )
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is incomplete: {', '.join(problems)}. A run "
            "stopped while writing it (a crash or a full disk), or it was copied without those files (a checkpoint "
            "not written by CEAGTrainer has no constrained state at all); resuming it would fail or restart the "
            f"multipliers, buffers and masks from zero. {fallback}: {_FIX}."
        )
    return resume_from_checkpoint


def _newest_whole(output_dir: str, save_only_model: bool) -> str:
    folders = checkpoints_newest_first(output_dir)
    skipped = []
    for folder in folders:
        problems = checkpoint_problems(folder, save_only_model)
        if not problems:
            break
        skipped.append(f"{os.path.basename(folder)} ({', '.join(problems)})")
    else:
        found = f": none is complete, {'; '.join(skipped)}" if skipped else ""
        raise ValueError(
            f"resume_from_checkpoint=True: no complete checkpoint in output_dir={output_dir!r}{found}. Start a "
            "new run without resume_from_checkpoint, or give the path of a complete checkpoint."
        )
    if skipped:
        warnings.warn(
            f"resume_from_checkpoint=True: passing over the incomplete {'; '.join(skipped)} in {output_dir} (a "
            "run stopped while writing it: a crash or a full disk). Resuming from "
            f"{os.path.basename(folder)}, the last complete checkpoint. Delete the incomplete folder to silence "
            "this warning.",
            UserWarning,
            stacklevel=3,
        )
    return folder


def check_writable_folder(path: str, field: str = "output_dir") -> None:
    """Refuse, with a `ValueError` naming `field`, a folder the run could not write its outputs into (a path
    under a file, a read-only folder or disk), before any work; creates the folder as the Trainer would, and
    leaves nothing else behind. Permission bits alone do not tell (root writes anywhere): a file is written."""
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"{field}={path!r} cannot be written ({type(error).__name__}: {error.strerror or error}): the run "
            f"would fail when it first saves. Give an {field} in a folder you can write to, or free space or fix "
            "the permissions there."
        ) from error
