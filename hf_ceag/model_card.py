"""The model card (`README.md`) of a pruned model: Hub metadata and a body that audits every group.

It is rendered from `model_cards/ceag_model_card.md` with `huggingface_hub.ModelCard.from_template`, from the
same `report.json` document the scripts print and the logs read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .report import plot_excess_gaps, report_markdown

TEMPLATE_NAME = "ceag_model_card.md"
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


def template_path() -> Path:
    """The card template: shipped as `hf_ceag.model_cards`, or the repository's `model_cards/` folder."""
    try:
        packaged = importlib.resources.files("hf_ceag.model_cards") / TEMPLATE_NAME
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _eval_results(report: dict[str, Any], dataset_name: str) -> list[EvalResult]:
    results = []

    def add(metric_type: str, name: str, value: float, split: str) -> None:
        results.append(
            EvalResult(
                task_type="image-classification",
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


def violation_warning(report: dict[str, Any]) -> str | None:
    """The warning text if the training constraints are violated, else None."""
    train = report["splits"].get("train")
    if train is None or train["satisfied"]:
        return None
    return (
        f"On its training data, {train['violated_groups']} group(s) exceed the tolerance ε = {report['tolerance']:g} "
        f"(max excess accuracy gap {train['max_excess_gap']:+.4f})."
    )


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
) -> ModelCard:
    """Render the card. `training` holds the run settings shown in the card (pruning, buffer_size, dual_lr,
    epochs, group_columns). A violated model gets a warning at the top (callers gate publishing)."""
    hub_base = base_model if base_model and "/" in base_model and not os.path.exists(base_model) else None
    dataset_label = dataset_name or "scikit-learn digits (embedded)"
    hub_dataset = (
        dataset_name if dataset_name and "/" in dataset_name and not os.path.exists(dataset_name) else None
    )
    tags = ["image-classification", "pruning", "sparse", "fairness", "hf-ceag", report["method"]]
    if timm_architecture:
        tags.append("timm")
    card_data = ModelCardData(
        library_name="transformers",
        tags=tags,
        base_model=hub_base,
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name,
        eval_results=_eval_results(report, hub_dataset or dataset_label),
    )
    warning = violation_warning(report) if allow_violated_constraints else None
    tables = {split: report_markdown(report, split) for split in report["splits"]}
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        warning=warning,
        method_text=METHOD_TEXT.get(report["method"], report["method"]),
        base_model_text=f"`{base_model}`" if base_model else "a dense model",
        tolerance=report["tolerance"],
        sparsity=report["sparsity"],
        sparsity_definition=report.get("sparsity_definition", "fraction of zero weights in the pruned layers"),
        target_sparsity=report["target_sparsity"],
        verdicts=[data.get("verdict", "") for data in report["splits"].values()],
        tables=tables,
        layer_sparsity=report.get("layer_sparsity", {}),
        min_samples=next(iter(report["splits"].values()))["min_samples"],
        repo_or_path=repo_or_path,
        timm_architecture=timm_architecture,
        timm_hub_prefix="hf-hub:" if "/" in repo_or_path and not os.path.exists(repo_or_path) else "local-dir:",
        command=command or "(not recorded)",
        versions=library_versions(),
        pruning_text=training.get("pruning", ""),
        buffer_size=training.get("buffer_size", ""),
        dual_lr=training.get("dual_lr", ""),
        epochs=training.get("epochs", ""),
        group_columns=", ".join(training.get("group_columns", [])),
    )


def write_model_folder_extras(report: dict[str, Any], card: ModelCard, folder: str) -> None:
    """Write `README.md` (the card) and `excess_gaps.png` (the plot the card shows) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    card.save(os.path.join(folder, "README.md"))
    plot_excess_gaps(report, os.path.join(folder, "excess_gaps.png"))
