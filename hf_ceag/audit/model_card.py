"""The model card (`README.md`) of a pruned model: Hub metadata and a body that audits every group.

It is rendered from `model_cards/ceag_model_card.md` with `huggingface_hub.ModelCard.from_template`, from the
same `report.json` document the scripts print and the logs read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..models.rgb_input import RGB_INPUT_KEY, input_channels
from ..models.saved_weights import saved_parameter_names
from .report import INCONCLUSIVE, plot_excess_gaps, report_markdown

TEMPLATE_NAME = "ceag_model_card.md"
UNNAMED_DATASET = "unnamed dataset"
MAX_GROUP_RESULTS = 100  # per split in the YAML model-index; report.json has them all
METHOD_TEXT = {
    "ceag": "CEAG (constrained excess accuracy gap)",
    "nft": "naive fine-tuning (NFT, no mitigation)",
    "el": "equalized loss (EL)",
    "el+rb": "equalized loss with replay buffers (EL+RB)",
    "fairgrape": "FairGRAPE (group-aware importance pruning, no fine-tuning constraints)",
}
VERSIONED = (
    "hf-ceag",
    "torch",
    "transformers",
    "timm",
    "cooper-optim",
    "accelerate",
    "datasets",
    "huggingface_hub",
)


TASK_KINDS = {
    "image-classification": "image classifier",
    "text-classification": "text classifier",
    "audio-classification": "audio classifier",
}
AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "audio-classification": "AutoModelForAudioClassification",
}
_TASK_OF_INPUT = {
    "pixel_values": "image-classification",
    "input_ids": "text-classification",
    "input_values": "audio-classification",
    "input_features": "audio-classification",
}


def model_task(model: Any) -> str:
    """The pipeline task of a classifier, from its main input (`pixel_values`: image-classification)."""
    return _TASK_OF_INPUT.get(getattr(model, "main_input_name", "pixel_values"), "classification")


def model_card_details(model: Any, folder: str, pruned: dict[str, Any]) -> dict[str, Any]:
    """What the card says about a model saved into `folder`: its `task`, whether it takes `grayscale` images, the
    saved names of its `pruned` layers (`layer_names`), and the dense parent's `license` when its card has one."""
    config = getattr(model, "config", None)
    return {
        "task": model_task(model),
        "grayscale": input_channels(config) == 1,
        "rgb_input": _saved_as_rgb(folder),
        "with_processor": any(
            os.path.isfile(os.path.join(folder, name))
            for name in ("preprocessor_config.json", "tokenizer_config.json")
        ),
        "layer_names": saved_parameter_names(os.path.join(folder, "model.safetensors"), pruned),
        "license": dense_folder_license(getattr(config, "_name_or_path", None)),
    }


def _saved_as_rgb(folder: str) -> bool:
    # a grayscale model whose saved folder takes RGB images (models/rgb_input.py)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return RGB_INPUT_KEY in json.load(f)


def _is_hub_id(name: str | None) -> bool:
    # "org/name", not a path of this machine
    return (
        bool(name) and name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/", "~"))
    )


def _local_name(path: str) -> str:
    # a local folder by its own name only: the card must not show the training machine's paths
    return os.path.basename(os.path.normpath(path)) if os.path.sep in path or os.path.exists(path) else path


def dense_folder_license(path: str | None) -> str | None:
    """The license in the metadata of a (dense) model folder's card, if it has one."""
    card = os.path.join(path, "README.md") if path and os.path.isdir(path) else None
    if card is None or not os.path.isfile(card):
        return None
    try:
        return ModelCard.load(card).data.license
    except (OSError, ValueError, yaml.YAMLError):  # a README that is no model card
        return None


def _parent_text(base_model: str | None, hub_base: str | None, parent_sparsity: float | None) -> str:
    # What the card says the model was pruned from: a parent with 1 % or more exact zeros is not called dense.
    sparse = parent_sparsity is not None and parent_sparsity >= 0.01
    kind = f"a model that was already {100 * parent_sparsity:.1f} % sparse" if sparse else "a dense model"
    if hub_base:
        return f"`{base_model}`" + (f" ({kind})" if sparse else "")
    return f"{kind} (local folder `{_local_name(base_model)}`)" if base_model else kind


def template_path() -> Path:
    """The card template: shipped as `hf_ceag.model_cards`, or the repository's `model_cards/` folder."""
    try:
        packaged = importlib.resources.files("hf_ceag.model_cards") / TEMPLATE_NAME
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE_NAME


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _eval_results(report: dict[str, Any], dataset_name: str, task: str) -> list[EvalResult]:
    results = []

    def add(metric_type: str, name: str, value: float, split: str) -> None:
        if value is None or not math.isfinite(value):  # a figure that does not exist (no judged group)
            return
        results.append(
            EvalResult(
                task_type=task,
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=metric_type,
                metric_name=name,
                metric_value=round(float(value), 6),
            )
        )

    for split, data in report["splits"].items():
        add("accuracy", f"accuracy ({split})", data["accuracy_sparse"], split)
        add("max_excess_accuracy_gap", f"max excess accuracy gap ({split})", data["max_excess_gap"], split)
        for group in data["groups"][:MAX_GROUP_RESULTS]:
            add("accuracy", f"accuracy [{group['name']}] ({split})", group["accuracy_sparse"], split)
            add(
                "excess_accuracy_gap",
                f"excess accuracy gap [{group['name']}] ({split})",
                group["excess_gap"],
                split,
            )
    return results


def training_settings(args, schedule, group_columns: list[str]) -> dict[str, Any]:
    """The card's "Training" facts from a `CEAGConfig` and its resolved `CubicSchedule` (None before training)."""
    pruning = f"magnitude, {args.pruning_scope}, cubic schedule"
    if schedule is not None:
        pruning += f" from step {schedule.start} to {schedule.end}, masks every {schedule.frequency} steps"
    if args.keep_first_last_dense:
        pruning += "; first conv and last linear layer kept dense"
    return {
        "pruning": pruning,
        "buffer_size": args.buffer_size,
        "dual_lr": args.dual_lr,
        "constraint_margin": args.constraint_margin if args.mitigation == "ceag" else 0.0,
        "epochs": args.num_train_epochs if args.max_steps <= 0 else f"{args.max_steps} steps",
        "group_columns": group_columns,
    }


def violation_warning(report: dict[str, Any]) -> str | None:
    """What keeps the model from being published, or None: it gates `push_to_hub` (and opens the card of a model
    published anyway).

    * A training group breaks its constraint: its point ψ_g exceeds ε (the quantity the method constrains) or its
      whole ψ_g interval lies above ε ('violated'). An 'inconclusive' group whose point ψ_g is within ε does not
      block publishing; the card names it under its verdict.
    * The overall accuracy fell by more than the report's `max_accuracy_drop` on any split: ψ_g is relative, so a
      model that collapsed for every group alike would otherwise pass."""
    problems = []
    train = report["splits"].get("train")
    over = max(train.get("groups_over_tolerance", 0), train["violated_groups"]) if train is not None else 0
    if over:
        problems.append(
            f"On its training data, {over} group(s) exceed the tolerance ε = {report['tolerance']:g} "
            f"(max excess accuracy gap {train['max_excess_gap']:+.4f}; {train['violated_groups']} of them violated "
            f"by the {train.get('status_basis', 'point estimate')})."
        )
    limit = report.get("max_accuracy_drop")
    for split, data in report["splits"].items():
        drop = data.get("accuracy_drop")
        if limit is not None and drop is not None and drop > limit:
            problems.append(
                f"On its {split} data, the overall accuracy fell by {drop:.3f} ({data['accuracy_dense']:.3f} → "
                f"{data['accuracy_sparse']:.3f}), more than max_accuracy_drop = {limit:g}: small excess gaps then "
                "mean only that every group lost alike."
            )
    return " ".join(problems) or None


def inconclusive_groups(report: dict[str, Any]) -> dict[str, list[str]]:
    """Per split, the names of the groups whose ψ_g interval straddles ε (splits without any are left out)."""
    named = {
        split: [g["name"] for g in data["groups"] if g["status"] == INCONCLUSIVE]
        for split, data in report["splits"].items()
    }
    return {split: names for split, names in named.items() if names}


def build_model_card(
    report: dict[str, Any],
    *,
    model_name: str,
    repo_or_path: str,
    training: dict[str, Any],
    base_model: str | None = None,
    dataset_name: str | None = None,
    command: str = "",
    timm_architecture: str | None = None,
    allow_violated_constraints: bool = False,
    license: str | None = None,
    task: str = "image-classification",
    layer_names: dict[str, str] | None = None,
    grayscale: bool = False,
    rgb_input: bool = False,
    with_processor: bool = True,
    python_config: str = "",
) -> ModelCard:
    """Render the card. `training` holds the run settings shown in the card (pruning, buffer_size, dual_lr,
    epochs, group_columns). A violated model gets a warning at the top (callers gate publishing).

    `with_processor`: the folder holds the preprocessing (image processor), so `pipeline` works on it.
    `repo_or_path`, `base_model` and `dataset_name` go into the metadata when they are Hub ids; a local folder
    is named by its folder name only (never a path of the machine that trained it). `task` is the pipeline
    task (`model_task`); `layer_names` maps the pruned layers' parameter names to their names in the saved
    weights file (`saved_parameter_names`). `dataset_name` is the data's own name (None: the card says it is
    unnamed). `command` is the command line that made the model; without one (a run from Python),
    `python_config` (the `CEAGConfig(...)` call, `config_call`) is shown instead."""
    hub_base = base_model if _is_hub_id(base_model) else None
    dataset_label = dataset_name or UNNAMED_DATASET
    hub_dataset = dataset_name if _is_hub_id(dataset_name) else None
    tags = [task, "pruning", "sparse", "fairness", "hf-ceag", report["method"]]
    if timm_architecture:
        tags.append("timm")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        license=license,
        tags=tags,
        base_model=hub_base,
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name,
        eval_results=_eval_results(report, hub_dataset or _local_name(dataset_label), task),
    )
    layer_names = layer_names or {}
    load_from = repo_or_path if _is_hub_id(repo_or_path) else _local_name(repo_or_path)
    warning = violation_warning(report) if allow_violated_constraints else None
    tables = {split: report_markdown(report, split) for split in report["splits"]}
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        warning=warning,
        method_text=METHOD_TEXT.get(report["method"], report["method"]),
        model_kind=TASK_KINDS.get(task, "classifier"),
        base_model_text=_parent_text(base_model, hub_base, report.get("dense_parent_sparsity")),
        tolerance=report["tolerance"],
        sparsity=report["sparsity"],
        sparsity_definition=report.get("sparsity_definition", "fraction of zero weights in the pruned layers"),
        target_sparsity=report["target_sparsity"],
        verdicts=[data.get("verdict", "") for data in report["splits"].values()],
        inconclusive=inconclusive_groups(report),
        status_basis=next(iter(report["splits"].values())).get("status_basis", "point estimate"),
        tables=tables,
        split_rows=report.get("split_rows", {}),
        layer_sparsity={layer_names.get(k, k): v for k, v in report.get("layer_sparsity", {}).items()},
        min_samples=next(iter(report["splits"].values()))["min_samples"],
        repo_or_path=load_from,
        local_folder=not _is_hub_id(repo_or_path),
        task=task,
        auto_class=AUTO_CLASSES.get(task, "AutoModel"),
        grayscale=grayscale,
        rgb_input=rgb_input,
        with_processor=with_processor,
        timm_architecture=timm_architecture,
        timm_hub_prefix="hf-hub:" if _is_hub_id(repo_or_path) else "local-dir:",
        command=command,
        python_config=python_config,
        dataset_text=f"`{dataset_label}`" if dataset_name else "an unnamed dataset (its name was not recorded)",
        hf_ceag_version=library_versions().get("hf-ceag", "0.1.0"),
        max_accuracy_drop=report.get("max_accuracy_drop"),
        versions=library_versions(),
        pruning_text=training.get("pruning", ""),
        buffer_size=training.get("buffer_size", ""),
        dual_lr=training.get("dual_lr", ""),
        constraint_margin=training.get("constraint_margin", 0.0),
        selected=report.get("selected_checkpoint"),
        epochs=training.get("epochs", ""),
        group_columns=", ".join(training.get("group_columns", [])),
    )


def run_model_card(
    report: dict[str, Any],
    model: Any,
    folder: str,
    args,
    schedule,
    group_columns: list[str],
    pruner,
    repo: str | None,
    command: str,
    allow_violated_constraints: bool,
    details: dict[str, Any],
) -> ModelCard:
    """The card of a `CEAGTrainer` run's saved `folder`: `build_model_card` with the run's settings, the saved
    file's layer names and the model's kind (`model_card_details`), named by `repo` (a Hub id) or the folder.
    `details` are `Trainer.create_model_card`'s keyword arguments: `model_name`, `finetuned_from` (the dense
    model's Hub id, shown as base model), `dataset` (the dataset's Hub id) and `license`."""
    given = {k: v for k, v in details.items() if v is not None}
    kwargs = {**model_card_details(model, folder, pruner.parameters), **given}
    config = getattr(model, "config", None)
    timm_architecture = getattr(config, "architecture", None)
    return build_model_card(
        report,
        model_name=kwargs.get("model_name") or os.path.basename(os.path.abspath(folder)),
        repo_or_path=repo or os.path.abspath(folder),
        training=training_settings(args, schedule, group_columns),
        base_model=kwargs.get("finetuned_from") or getattr(config, "_name_or_path", None),
        dataset_name=kwargs.get("dataset") if isinstance(kwargs.get("dataset"), str) else None,
        command=command,
        timm_architecture=timm_architecture if isinstance(timm_architecture, str) else None,
        allow_violated_constraints=allow_violated_constraints,
        python_config="" if command else config_call(args),
        **{k: kwargs[k] for k in ("license", "task", "grayscale", "rgb_input", "layer_names", "with_processor")},
    )


# TrainingArguments fields that shape the result, shown with hf-ceag's own in a run's `CEAGConfig(...)` call
RESULT_FIELDS = (
    "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim",
    "optim_args", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm",
    "label_smoothing_factor", "bf16", "fp16", "seed", "data_seed", "train_sampling_strategy",
)  # fmt: skip


def config_call(args) -> str:
    """The `CEAGConfig(...)` call that gives `args` (a `CEAGConfig`) its result-shaping values: hf-ceag's own
    fields and `RESULT_FIELDS` where they differ from the defaults, with the output folder named by its name only
    (and no token: none of these fields holds one)."""
    import dataclasses

    own = set(type(args).__annotations__)
    shown = [f"output_dir={_local_name(args.output_dir)!r}"]
    for f in dataclasses.fields(args):
        if not f.init or (f.name not in own and f.name not in RESULT_FIELDS):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(args, f.name)
        if value != default and "token" not in f.name:
            shown.append(f"{f.name}={getattr(value, 'value', value)!r}")  # an enum by its value
    return "CEAGConfig(" + ", ".join(shown) + ")"


def write_model_folder_extras(report: dict[str, Any], card: ModelCard, folder: str) -> None:
    """Write `README.md` (the card) and `excess_gaps.png` (the plot the card shows) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    card.save(os.path.join(folder, "README.md"))
    plot_excess_gaps(report, os.path.join(folder, "excess_gaps.png"))
