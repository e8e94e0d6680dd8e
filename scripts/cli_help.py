"""`--help` of scripts/run_ceag.py, grouped, and printed without importing torch.

`run_ceag.py --help` lists the data and model flags and hf-ceag's own flags first, grouped, with the defaults the
script uses; `--help_all` prints the real parser's help, every `TrainingArguments` flag included. Building the real
parser imports transformers and torch (ten seconds or more), so the short help is rendered from
`run_ceag_help.json`, the flags' descriptions as that parser gives them. Running this file rewrites it:

    python scripts/cli_help.py

(tests/test_cli_help.py fails, naming this command, when a flag, a help text or a default has changed since.)
This module imports nothing outside the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from enum import Enum
from types import ModuleType
from typing import Any

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_ceag_help.json")

# The groups of the short help, in order: title, a line under it (or none), and their flags (space-separated).
HELP_GROUPS: dict[str, tuple[str, str]] = {
    "data": (
        "",
        (
            "dataset_name data_dir group_columns group_names streaming class_names image_column label_column "
            "image_size test_size validation_split digits_variant"
        ),
    ),
    "model and methods": (
        "",
        "model_name_or_path dense_epochs dense_learning_rate methods mitigation",
    ),
    "hf-ceag: constraints": (
        "",
        (
            "tolerance constraint_margin dual_lr buffer_size dual_optimizer nupi_kp nupi_ki nupi_ema_nu "
            "constraint_split surrogate_overall_gradient mitigate_during_pruning max_accuracy_drop allow_weak_dense_model"
        ),
    ),
    "hf-ceag: pruning": (
        "",
        (
            "target_sparsity initial_sparsity pruning_start_epoch pruning_end_epoch pruning_start_step "
            "pruning_end_step pruning_frequency "
            "pruning_scope keep_first_last_dense pruning_method fairgrape_rounds "
            "fairgrape_calibration_batches"
        ),
    ),
    "training": (
        "TrainingArguments flags. The recipe also sets {also_set}; --help_all lists every flag.",
        (
            "output_dir num_train_epochs max_steps learning_rate optim lr_scheduler_type "
            "per_device_train_batch_size seed bf16 logging_steps logging_nan_inf_filter push_to_hub"
        ),
    ),
}
HELP_FLAGS = ("-h", "--help")
USAGE = "%(prog)s [CONFIG.json|CONFIG.yaml] [--FLAG VALUE ...]"
HELP_ALL_FLAG = "--help_all"


def shown(value: Any) -> str:
    """A default as it is typed on the command line: lists space-separated, booleans as true/false."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default, as typed on the command line, unless its help already says it (`(default:`);
    says what the `--no_<flag>` form of a boolean does instead of giving it a second default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.nargs == 0 and action.const is False and action.option_strings[0].startswith("--no_"):
            return f"Same as --{action.dest} false."
        if "(default" in help_text or action.default is argparse.SUPPRESS:
            return help_text
        return f"{help_text} (default: {shown(action.default).replace('%', '%%')})"


class _ShortHelp(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(short_help(parser.prog), end="")
        parser.exit()


def add_help_flags(parser: argparse.ArgumentParser) -> None:
    """`-h/--help` (the short, grouped help) and `--help_all` (the parser's own, every flag) on a parser made with
    `add_help=False`."""
    parser.add_argument(*HELP_FLAGS, action=_ShortHelp, help="The data, model and hf-ceag flags, grouped.")
    parser.add_argument(HELP_ALL_FLAG, action="help", help="Every flag, each TrainingArguments one included.")


def describe(parser: argparse.ArgumentParser, description: str, also_set: list[str]) -> dict[str, Any]:
    """What the short help shows of `parser` (the script's real one): for each flag of `HELP_GROUPS`, its value
    name and its help text with the default the parser would use; the defaults of the `also_set` flags, which
    the short help names without describing them; and how many flags there are."""
    formatter = parser._get_formatter()
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.option_strings[0] == f"--{a.dest}"}
    flags = {}
    for _, names in HELP_GROUPS.values():
        for name in names.split():
            action = actions[name]
            flags[name] = {"metavar": _value_name(action), "help": formatter._get_help_string(action)}
    also = ", ".join(f"{name}={shown(actions[name].default)}" for name in also_set if name not in flags)
    return {"description": description, "flag_count": len(actions), "also_set": also, "flags": flags}


def _value_name(action: argparse.Action) -> str:
    choices = "{" + ",".join(str(c) for c in action.choices or ()) + "}"
    if action.choices:  # a longer list is for the help text to name
        return choices if len(choices) <= 16 else "STR"
    name = {"float": "FLOAT", "int": "INT", "str": "STR", "string_to_bool": "BOOL"}.get(
        getattr(action.type, "__name__", ""), "VALUE"
    )
    return f"{name} ..." if action.nargs in ("+", "*") else name


def short_help(prog: str) -> str:
    """The grouped help of the script's own flags, from `SNAPSHOT`."""
    with open(SNAPSHOT) as f:
        snapshot = json.load(f)
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=USAGE,
        description=snapshot["description"],
        epilog="A .json or .yaml config file given first sets defaults that the flags after it override.",
        add_help=False,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=28),
    )
    for title, (line, names) in HELP_GROUPS.items():
        group = parser.add_argument_group(title, line.format(also_set=snapshot["also_set"]) or None)
        for name in names.split():
            flag = snapshot["flags"][name]
            group.add_argument(f"--{name}", metavar=flag["metavar"], help=flag["help"])
    group = parser.add_argument_group("help")
    group.add_argument(*HELP_FLAGS, action="store_true", help="This list.")
    group.add_argument(HELP_ALL_FLAG, action="store_true", help=f"All {snapshot['flag_count']} flags.")
    return parser.format_help()


def exit_with_short_help_if_asked(argv: list[str], prog: str) -> None:
    """Print the short help and exit when `argv` asks for it (before the script imports torch)."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(short_help(prog), end="")
        sys.exit(0)


def snapshot_of(run_ceag: ModuleType) -> dict[str, Any]:
    """What `SNAPSHOT` must hold for the run_ceag.py module `run_ceag`: `describe` of its real parser."""
    recipe = [name for name in run_ceag.RECIPE_DEFAULTS if name != "mitigation"]  # --mitigation is described
    return describe(run_ceag.build_parser(), run_ceag.__doc__.strip().splitlines()[0], recipe)


def write_snapshot() -> None:
    """Rewrite `SNAPSHOT` from run_ceag.py's real parser."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import run_ceag

    snapshot = snapshot_of(run_ceag)
    with open(SNAPSHOT, "w") as f:
        json.dump(snapshot, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"Wrote {SNAPSHOT}")


if __name__ == "__main__":
    write_snapshot()
