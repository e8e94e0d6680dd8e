"""The constrained state saved beside every Trainer checkpoint, so a resumed run continues exactly.

It holds what `Trainer` does not save: the multipliers and the dual optimizer, the replay buffers and
per-group estimates, the pruning masks, the dense reference and the dense model's per-sample correctness
(for reports), the group index and the time spent pruning. Tensors go to `ceag_state.safetensors`, the rest to
`ceag_state.json`; nothing of it enters `model.safetensors`, and nothing is unpickled on load. Each file is
written under a temporary name and renamed into place, so a crash or a full disk never leaves half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from enum import Enum

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.groups import GroupIndex
from ..pruning.magnitude import MagnitudePruner
from .problems import GroupConstrainedProblem
from .reference import DenseReference
from .step import dual_optimizer_name

STATE_TENSORS = "ceag_state.safetensors"
STATE_JSON = "ceag_state.json"
FORMAT_VERSION = 1
DUAL_STATE_PREFIX = "dual_optimizer.state."


@dataclass
class ConstrainedState:
    """Everything of a `CEAGTrainer` run that lives outside the model and the primal optimizer."""

    reference: DenseReference
    group_index: GroupIndex
    mitigation: str
    buffer_size: int
    tensors: dict[str, torch.Tensor]
    dual_optimizer: dict | None
    estimate_reference: DenseReference | None = None  # held-out duals: the dense model on the held-out rows
    pruning_seconds: float = 0.0  # time spent pruning up to the checkpoint
    source: str | None = None  # the folder it was loaded from, named by errors

    @classmethod
    def of_trainer(cls, trainer) -> ConstrainedState:
        """`capture` of a `CEAGTrainer`'s live state."""
        return cls.capture(
            trainer.problem, trainer.dual_optimizer, trainer.pruner, trainer.dense_reference, trainer.dense_correct,
            trainer.group_index, trainer.args.mitigation, trainer.args.buffer_size, trainer.constraint_reference,
            trainer.pruning_seconds,
        )  # fmt: skip

    @classmethod
    def capture(
        cls,
        problem: GroupConstrainedProblem,
        dual_optimizer: torch.optim.Optimizer | None,
        pruner: MagnitudePruner,
        reference: DenseReference,
        dense_correct: dict[str, torch.Tensor],
        group_index: GroupIndex,
        mitigation: str,
        buffer_size: int,
        estimate_reference: DenseReference | None = None,
        pruning_seconds: float = 0.0,
    ) -> ConstrainedState:
        """Copy the live state (on CPU) out of the trainer's objects."""
        tensors = {
            "multiplier": problem.multiplier.weight.detach(),
            "estimate.value": problem.group_estimate,
            "estimate.weights": problem.estimate_weights,
            "estimate.observed": problem.observed.to(torch.uint8),
            "estimate.ready": problem.ready.to(torch.uint8),
            "dual_steps": problem.dual_step_count,
        }
        if problem.buffer is not None:
            tensors.update({f"buffer.{k}": v for k, v in problem.buffer.state_dict().items()})
        tensors.update({f"mask.{name}": m.to(torch.uint8) for name, m in pruner.state_dict().items()})
        tensors.update({f"dense_correct.{split}": c.to(torch.uint8) for split, c in dense_correct.items()})
        dual = None
        if dual_optimizer is not None:
            dual, dual_tensors = _split_dual_state(dual_optimizer)
            tensors.update(dual_tensors)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        return cls(
            reference, group_index, mitigation, buffer_size, tensors, dual, estimate_reference, pruning_seconds
        )

    def save(self, directory: str) -> None:
        """Write `ceag_state.safetensors` and `ceag_state.json` into `directory`, each whole or not at all."""
        os.makedirs(directory, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "mitigation": self.mitigation,
            "buffer_size": self.buffer_size,
            "reference": asdict(self.reference),
            "group_index": self.group_index.to_dict(),
            "dual_optimizer": self.dual_optimizer,
            "estimate_reference": asdict(self.estimate_reference) if self.estimate_reference else None,
            "pruning_seconds": self.pruning_seconds,
        }
        _write_whole(os.path.join(directory, STATE_TENSORS), lambda path: save_file(self.tensors, path))
        _write_whole(os.path.join(directory, STATE_JSON), lambda path: _dump_json(meta, path))

    @classmethod
    def load(cls, directory: str) -> ConstrainedState:
        """Read the state saved in a checkpoint folder; a `ValueError` naming the file and the fix if it is missing
        or cannot be read (cut short, not JSON, a key missing)."""
        missing = [f for f in (STATE_TENSORS, STATE_JSON) if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise ValueError(
                f"Checkpoint {directory!r} has no constrained state ({', '.join(missing)} missing): it was not "
                "written by CEAGTrainer, or was copied without those files. Resuming would silently restart "
                "the multipliers, buffers and masks from zero; resume from a CEAGTrainer checkpoint instead, "
                "or start a new run without resume_from_checkpoint."
            )
        path = os.path.join(directory, STATE_JSON)
        try:
            with open(path, encoding="utf-8") as f:
                state = cls._from_meta(json.load(f))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise unreadable(path, error) from error
        path = os.path.join(directory, STATE_TENSORS)
        try:
            state.tensors = load_file(path)
        except (OSError, SafetensorError) as error:
            raise unreadable(path, error) from error
        state.source = directory
        return state

    @classmethod
    def _from_meta(cls, meta: dict) -> ConstrainedState:
        # the JSON half; the dense references' derived figures (accuracy, loss) are recomputed, not read
        references = []
        for data in (meta["reference"], meta.get("estimate_reference")):
            if data is not None:
                data = {k: v for k, v in data.items() if k not in ("accuracy", "loss")}
            references.append(DenseReference(**data) if data is not None else None)
        return cls(
            reference=references[0],
            group_index=GroupIndex.from_dict(meta["group_index"]),
            mitigation=meta["mitigation"],
            buffer_size=meta["buffer_size"],
            tensors={},
            dual_optimizer=meta["dual_optimizer"],
            estimate_reference=references[1],
            pruning_seconds=float(meta.get("pruning_seconds", 0.0)),
        )

    def check_compatible(self, args, group_names: list[str], held_out: bool) -> None:
        """Refuse to resume into a run (`args`, a `CEAGConfig`) whose groups, mitigation, buffer size or use of
        held-out duals (`held_out`) differ from the checkpoint's."""
        saved = self.group_index.names[: self.group_index.num_groups]
        if saved != group_names:
            raise ValueError(f"Checkpoint groups {saved} differ from this run's training groups {group_names}.")
        if (self.mitigation, self.buffer_size) != (args.mitigation, args.buffer_size):
            raise ValueError(
                f"Checkpoint was written with mitigation={self.mitigation!r}, buffer_size={self.buffer_size}; "
                f"this run has mitigation={args.mitigation!r}, buffer_size={args.buffer_size}. Use the same settings."
            )
        if (self.estimate_reference is not None) != held_out:
            raise ValueError(
                f"Checkpoint was written with{'out' if self.estimate_reference is None else ''} held-out duals; "
                f"this run has constraint_split={args.constraint_split}. Use the checkpoint's setting."
            )

    def dense_correct(self) -> dict[str, torch.Tensor]:
        prefix = "dense_correct."
        return {k[len(prefix) :]: v.bool() for k, v in self.tensors.items() if k.startswith(prefix)}

    def restore(
        self,
        problem: GroupConstrainedProblem,
        dual_optimizer: torch.optim.Optimizer | None,
        pruner: MagnitudePruner,
    ) -> None:
        """Load multipliers, estimates, buffers, dual optimizer and masks into the trainer's objects; refuse a
        dual optimizer other than the checkpoint's."""
        if dual_optimizer is not None and self.dual_optimizer is not None:
            saved, live = self.dual_optimizer.get("name", "sgd"), dual_optimizer_name(dual_optimizer)
            if saved != live:
                raise ValueError(
                    f"Checkpoint was written with dual_optimizer={saved!r}; this run has dual_optimizer={live!r}. "
                    f"Resume with --dual_optimizer {saved}, or start a new run without resume_from_checkpoint."
                )
        try:
            self._restore_tensors(problem, pruner)
        except KeyError as error:  # a tensor missing
            raise unreadable(os.path.join(self.source or ".", STATE_TENSORS), error) from error
        if dual_optimizer is not None and self.dual_optimizer is not None:
            self._restore_dual_optimizer(dual_optimizer)

    def _restore_tensors(self, problem: GroupConstrainedProblem, pruner: MagnitudePruner) -> None:
        t = self.tensors
        device = problem.multiplier.weight.device
        with torch.no_grad():
            # checkpoints written before the multiplier became dense hold it as [G, 1]
            problem.multiplier.weight.copy_(t["multiplier"].to(device).reshape(problem.multiplier.weight.shape))
        problem.group_estimate = t["estimate.value"].to(device)
        problem.estimate_weights = t["estimate.weights"].to(device)
        problem.observed = t["estimate.observed"].to(device).bool()
        problem.ready = t["estimate.ready"].to(device).bool()
        problem.dual_step_count = (t["dual_steps"] if "dual_steps" in t else torch.tensor(0)).to(device)
        if problem.buffer is not None:
            problem.buffer.load_state_dict({k: t[f"buffer.{k}"] for k in ("values", "position", "count")})
        pruner.load_state_dict({k[len("mask.") :]: v for k, v in t.items() if k.startswith("mask.")})

    def _restore_dual_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        # The JSON holds plain numbers and names; the live optimizer's groups say which were tensors or enums.
        groups = []
        for live, saved in zip(optimizer.param_groups, self.dual_optimizer["param_groups"]):
            group = dict(saved)
            for key, value in live.items():
                if isinstance(value, torch.Tensor) and key in group:
                    group[key] = torch.tensor(group[key], dtype=value.dtype, device=value.device)
                elif isinstance(value, Enum) and key in group:
                    group[key] = type(value)[group[key]]
            groups.append(group)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            if key.startswith(DUAL_STATE_PREFIX):
                index, name = key[len(DUAL_STATE_PREFIX) :].split(".", 1)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": groups})


def _split_dual_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """The dual optimizer's `state_dict()` as JSON (its name and hyperparameters: tensors as numbers, enums
    by name) and tensors (per-parameter state, e.g. nuPI's ξ, as `dual_optimizer.state.<index>.<name>`)."""
    full = optimizer.state_dict()
    tensors = {
        f"{DUAL_STATE_PREFIX}{index}.{name}": value
        for index, values in full["state"].items()
        for name, value in values.items()
    }
    if any(not isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"ConstrainedState: the dual optimizer's state {full['state']} holds non-tensors.")

    def plain(value):
        if isinstance(value, torch.Tensor):
            return value.tolist()
        return value.name if isinstance(value, Enum) else value

    groups = [{k: plain(v) for k, v in group.items()} for group in full["param_groups"]]
    return {"name": dual_optimizer_name(optimizer), "param_groups": groups}, tensors


def unreadable(path: str, error: Exception) -> ValueError:
    """The error for a constrained-state file that cannot be read back: which file, what is wrong, the fix."""
    reason = f"key {error} missing" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
    return ValueError(
        f"Cannot read {path} ({reason}): the checkpoint is damaged (a crash or a full disk while it was written, "
        "or an edit). Resume from an earlier checkpoint, or start a new run without resume_from_checkpoint."
    )


def _write_whole(path: str, write) -> None:
    # `write(temporary_path)`, flushed to disk, then renamed over `path`: a reader sees the old file or the new one
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _dump_json(data: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
