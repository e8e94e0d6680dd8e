"""The benchmark's settings: the methods of the table, the targets, the full and --quick defaults, and the
flags that set them, validated before anything runs."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from transformers import HfArgumentParser

from hf_ceag import CEAGConfig
from hf_ceag.benchmarks.recipe import Recipe

# method key -> (label, mitigation, buffer size (None: the recipe's), pruning method)
METHODS = {
    "nft": ("NFT", "none", None, "magnitude"),
    "el": ("EL", "equalized_loss", 0, "magnitude"),
    "el+rb": ("EL+RB", "equalized_loss", None, "magnitude"),
    "ceag": ("CEAG", "ceag", None, "magnitude"),
    "ceag-paper": ("CEAG, paper's proxy", "ceag", None, "magnitude"),  # surrogate_overall_gradient=True
    "fairgrape": ("FairGRAPE", "none", None, "fairgrape"),
}
VARIANTS = ("styled", "balanced", "imbalanced")

TARGETS = {"ceag_over_nft": 1.05, "nft_over_plain": 1.03, "groups_10000_over_10": 1.10}
DEVICE_TARGETS = {"nft_over_plain": 1.01, "ceag_over_plain": 1.03}  # on a GPU (ResNet-50, 224 px, bf16, 128)


def full_settings(recipe: Recipe) -> dict[str, Any]:
    """The defaults of a full run (BENCHMARKS.md as committed): the recipe's epochs, every method."""
    return {
        "seeds": [0, 1, 2],
        "variants": ["styled", "imbalanced"],
        "sparsities": [0.95, 0.975, 0.99],
        "methods": list(METHODS),
        "epochs": recipe.defaults["num_train_epochs"],
        "pruning_end_epoch": recipe.defaults["pruning_end_epoch"],
        "dense_epochs": recipe.default("dense_epochs"),
        "overhead_steps": 60,
        "warmup_steps": 10,
        "repeats": 15,  # this 2-core VM moves whole runs by ±10 %: many interleaved rounds for the medians
        "groups": [10, 100, 1000, 10000],
        "scaling_steps": 60,
        "scaling_repeats": 5,
        "fairgrape_groups": [10, 100],
        "calibration_batches": 8,
        "default_seeds": [0, 1, 2, 3, 4],
        "default_threads": [1, 2],
        "default_flags": [],
        "constraint_splits": [0.2],
        "held_out_dual_lrs": [0.005],  # part 5: held-out duals with a lower dual lr
        "nupi_dual_lrs": [1.0],
        "sgd_dual_lrs": [0.05],
        "constraint_margins": [0.01, 0.02],
        "validation_splits": [0.2],  # part 5: the checkpoint chosen on a validation split of the training rows
        "streaming_rows": [50_000, 200_000],
        "streaming_map_rows": [10_000, 200_000],
        "streaming_eval_rows": 2_000,
        "streaming_steps": 200,
    }


def quick_settings(recipe: Recipe) -> dict[str, Any]:
    """The defaults of --quick: every part in miniature, to check that the benchmark runs."""
    return {
        **full_settings(recipe),
        "seeds": [0],
        "variants": ["imbalanced"],
        "sparsities": [0.9],
        "methods": ["nft", "ceag"],
        "epochs": 4,
        "pruning_end_epoch": 2,
        "dense_epochs": 5,
        "overhead_steps": 30,
        "warmup_steps": 5,
        "repeats": 3,
        "groups": [10, 10000],
        "scaling_steps": 30,
        "scaling_repeats": 1,
        "calibration_batches": 2,
        "default_seeds": [0],
        "default_threads": [1],
        "streaming_rows": [4_000],
        "streaming_map_rows": [1_000],
        "streaming_eval_rows": 500,
        "streaming_steps": 10,
        # the README's command in miniature: the small digits, a few epochs
        "default_flags": [
            "--digits_variant",
            "imbalanced",
            "--num_train_epochs",
            "3",
            "--pruning_end_epoch",
            "1",
            "--dense_epochs",
            "4",
            "--target_sparsity",
            "0.9",
            "--buffer_size",
            "8",
            "--allow_weak_dense_model",
            "true",
        ],
    }


def parse_settings(
    argv: list[str], recipe: Recipe, description: str | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's flags (unset ones take the --quick or full defaults) and the flags left for the recipe's
    parser; `description` is the `--help` text."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--quick", action="store_true", help="Every part in miniature (<= 2 minutes on 2 CPUs).")
    parser.add_argument("--output", help="Markdown file to write (default: BENCHMARKS.md; --quick: a temp dir).")
    parser.add_argument("--work_dir", help="Folder for models and runs, kept (default: a temp dir, removed).")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--sparsities", type=float, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--model", default="test_resnet", help="timm architecture or transformers model type.")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--epochs", type=float, help="Epochs of each pruning run (recipe: 8).")
    parser.add_argument(
        "--pruning_end_epoch", type=float, help="Epoch the target sparsity is reached (recipe: 3)."
    )
    parser.add_argument("--dense_epochs", type=float, help="Epochs of dense training (recipe: 15).")
    parser.add_argument("--overhead_steps", type=int, help="Optimizer steps per overhead run.")
    parser.add_argument("--warmup_steps", type=int, help="Untimed steps at the start of every timed run.")
    parser.add_argument("--repeats", type=int, help="Timed runs per overhead configuration (median taken).")
    parser.add_argument("--groups", type=int, nargs="+", help="Group counts of the scaling part.")
    parser.add_argument("--scaling_steps", type=int, help="Optimizer steps per group-scaling run.")
    parser.add_argument("--scaling_repeats", type=int, help="Timed runs per group count (median taken).")
    parser.add_argument(
        "--fairgrape_groups", type=int, nargs="*", help="Group counts of FairGRAPE's cost (none: skip it)."
    )
    parser.add_argument("--calibration_batches", type=int, help="FairGRAPE calibration batches per round.")
    parser.add_argument(
        "--default_seeds", type=int, nargs="+", help="Seeds of part 0 (the default run, as a user runs it)."
    )
    parser.add_argument(
        "--default_threads", type=int, nargs="+", help="OMP_NUM_THREADS values of part 0 (each with every seed)."
    )
    parser.add_argument(
        "--device_section",
        action="store_true",
        help="Only the overhead and FairGRAPE parts, as a section for BENCHMARKS.md measured on this machine's "
        "accelerator (e.g. --model resnet50 --image_size 224 --per_device_train_batch_size 128 --bf16 true).",
    )
    parser.add_argument(
        "--merge_device_section",
        metavar="FILE",
        help="Add FILE (written by --device_section, e.g. on a GPU machine) to BENCHMARKS.md's device sections, "
        "then stop.",
    )
    parser.add_argument(
        "--torch_compile_kinds", action="store_true", help="Also time plain and CEAG with --torch_compile true."
    )
    parser.add_argument(
        "--device_profile",
        action="store_true",
        help="Also profile one more run of plain, NFT and CEAG with torch.profiler (device time per op, side by "
        "side) into part 2 (for the device section on a GPU).",
    )
    parser.add_argument(
        "--generalisation_section",
        action="store_true",
        help="Only part 5 (levers for fairness on the test split against CEAG and NFT on the default recipe, over "
        "--default_seeds at each of --default_threads), written into BENCHMARKS.md's part-5 block (or --output).",
    )
    parser.add_argument(
        "--constraint_splits", type=float, nargs="*", help="Held-out fractions of part 5 (constraint_split)."
    )
    parser.add_argument(
        "--held_out_dual_lrs", type=float, nargs="*", help="Dual learning rates of part 5's held-out duals."
    )
    parser.add_argument(
        "--nupi_dual_lrs", type=float, nargs="*", help="Dual learning rates of part 5's nuPI duals."
    )
    parser.add_argument(
        "--sgd_dual_lrs",
        type=float,
        nargs="*",
        help="Dual learning rates of part 5's SGD duals (the recipe's: CEAG).",
    )
    parser.add_argument(
        "--constraint_margins", type=float, nargs="*", help="Training margins δ of part 5 (constraint_margin)."
    )
    parser.add_argument(
        "--validation_splits",
        type=float,
        nargs="*",
        help="Part 5: shares of the training rows kept out to choose the checkpoint on (run_ceag --validation_split).",
    )
    parser.add_argument(
        "--streaming_section",
        action="store_true",
        help="Only part 6 (peak memory of CEAG on a generated stream against the same rows map-style, each run "
        "in a fresh process), written into BENCHMARKS.md's part-6 block (or --output).",
    )
    parser.add_argument(
        "--streaming_rows", type=int, nargs="+", help="Rows of each generated training stream of part 6."
    )
    parser.add_argument(
        "--streaming_map_rows", type=int, nargs="+", help="Rows of each map-style run of part 6 (held in memory)."
    )
    parser.add_argument("--streaming_eval_rows", type=int, help="Evaluation rows of each run of part 6.")
    parser.add_argument("--streaming_steps", type=int, help="Optimizer steps of each run of part 6 (max_steps).")
    for hidden in ("--memory_child", "--memory_dense", "--memory_out", "--streaming_child"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    settings, extra = parser.parse_known_args(argv)
    for key, value in (quick_settings(recipe) if settings.quick else full_settings(recipe)).items():
        if getattr(settings, key, None) is None:
            setattr(settings, key, value)
    validate(settings)
    return settings, extra


def validate(settings: argparse.Namespace) -> None:
    """Refuse settings that cannot give a figure: more warm-up than steps, no repeat, no group, no row or too
    few steps for part 6, a sparsity outside (0, 1)."""
    for name in ("overhead_steps", "scaling_steps"):
        if getattr(settings, name) <= settings.warmup_steps:
            raise ValueError(
                f"--{name} must exceed --warmup_steps={settings.warmup_steps} (timed steps follow it)."
            )
    if settings.warmup_steps < 1 or settings.repeats < 1 or settings.scaling_repeats < 1:
        raise ValueError("--warmup_steps, --repeats and --scaling_repeats must be >= 1.")
    if min(settings.groups + settings.fairgrape_groups) < 1:
        raise ValueError("--groups and --fairgrape_groups must be >= 1.")
    if min(settings.streaming_eval_rows, *settings.streaming_rows, *settings.streaming_map_rows) < 1:
        raise ValueError("--streaming_rows, --streaming_eval_rows and --streaming_map_rows must be >= 1.")
    if settings.streaming_steps < 2:
        raise ValueError(f"--streaming_steps={settings.streaming_steps} must be >= 2 (pruning ends at half).")
    bad = [s for s in settings.sparsities if not 0.0 < s < 1.0]
    if bad:
        raise ValueError(f"--sparsities {bad} must lie in (0, 1), e.g. 0.9 for 90 %.")


def run_config(recipe: Recipe, settings, extra: list[str], output_dir: str, seed: int, variant: str):
    """The recipe's (script arguments, CEAGConfig) for one (variant, seed): its defaults plus the benchmark's
    settings and the `extra` flags."""
    parser = HfArgumentParser((recipe.arguments, CEAGConfig))
    parser.set_defaults(**recipe.defaults)
    args = [
        "--output_dir", output_dir, "--seed", str(seed), "--digits_variant", variant,
        "--model_name_or_path", settings.model, "--image_size", str(settings.image_size),
        "--num_train_epochs", str(settings.epochs), "--pruning_end_epoch", str(settings.pruning_end_epoch),
        "--dense_epochs", str(settings.dense_epochs), "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    if settings.quick:  # the miniature checks that every part runs: its dense models are barely trained
        args += ["--allow_weak_dense_model", "true"]
    return parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)


def method_config(config: CEAGConfig, method: str, sparsity: float, output_dir: str) -> CEAGConfig:
    """The config of one method of the table at one target sparsity."""
    _, mitigation, buffer_size, pruning_method = METHODS[method]
    return dataclasses.replace(
        config,
        output_dir=output_dir,
        target_sparsity=sparsity,
        mitigation=mitigation,
        buffer_size=config.buffer_size if buffer_size is None else buffer_size,
        pruning_method=pruning_method,
        surrogate_overall_gradient=method == "ceag-paper",
    )
