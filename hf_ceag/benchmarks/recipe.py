"""The run script the benchmark measures: its recipe defaults, its argument dataclass and its three steps.

The benchmark times and audits exactly what `scripts/run_ceag.py` does; the script hands its parts over as a
`Recipe`, so that this package never imports from `scripts/`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a benchmark run needs from the run script.

    `defaults` become the defaults of `TrainingArguments` (`RECIPE_DEFAULTS`); `arguments` is the script's
    own dataclass (`ScriptArguments`); `load_data(script, config) -> (data, channels)`,
    `dense_model(script, config, data, channels) -> dense_dir` and
    `prune_with(mitigation, dense_dir, config, data, processor) -> report` are its steps; `script` is the
    path of the script itself, run as a user runs it in part 0.
    """

    defaults: dict[str, Any]
    arguments: type
    load_data: Callable
    dense_model: Callable
    prune_with: Callable
    script: str

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.arguments):
            raise ValueError(
                f"Recipe.arguments={self.arguments!r} must be a dataclass (run_ceag.ScriptArguments)."
            )
        if not os.path.isfile(self.script):
            raise ValueError(f"Recipe.script={self.script!r} is not a file: pass the path of scripts/run_ceag.py.")

    @classmethod
    def from_module(cls, module: ModuleType) -> Recipe:
        """The recipe of a run-script module such as `scripts/run_ceag.py`."""
        return cls(
            defaults=module.RECIPE_DEFAULTS,
            arguments=module.ScriptArguments,
            load_data=module.load_data,
            dense_model=module.dense_model,
            prune_with=module.prune_with,
            script=os.path.abspath(module.__file__),
        )

    def default(self, field: str) -> Any:
        """The default of one of the script's own arguments (e.g. `dense_epochs`)."""
        return self.arguments.__dataclass_fields__[field].default
