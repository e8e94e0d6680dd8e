"""Image classifiers the trainer prunes: timm backbones (through `TimmWrapperForImageClassification`) and
transformers image classifiers. Built from scratch, or loaded from a local folder with safetensors."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

from .cifar_resnet import register_timm_models
from .rgb_input import narrow_to_grayscale, save_grayscale_as_rgb


def build_classifier(
    name_or_path: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    channels: int = 3,
    image_size: int = 224,
) -> PreTrainedModel:
    """An image classifier with `num_labels` classes.

    * a folder saved with `save_pretrained` (or a Hub id): loaded with `AutoModelForImageClassification`
      (safetensors only, no remote code);
    * a timm architecture name (e.g. `resnet18`, `test_resnet`): a randomly initialised timm model wrapped in
      `TimmWrapperForImageClassification`;
    * a transformers model type (e.g. `resnet`, `vit`): a randomly initialised model of that type.
    """
    import timm

    register_timm_models()  # also for a saved folder of one of hf-ceag's own timm architectures
    id2label = id2label or {i: str(i) for i in range(num_labels)}
    label2id = {v: k for k, v in id2label.items()}
    if os.path.isdir(name_or_path) or "/" in name_or_path:
        return load_classifier(
            name_or_path, grayscale=channels == 1, num_labels=num_labels, id2label=id2label, label2id=label2id
        )
    if name_or_path in timm.list_models():
        return _timm_classifier(name_or_path, num_labels, id2label, label2id, channels, image_size)
    try:
        config = AutoConfig.for_model(
            name_or_path,
            num_labels=num_labels,
            id2label=id2label,
            label2id=label2id,
            num_channels=channels,
            image_size=image_size,
        )
    except ValueError as error:
        raise ValueError(
            f"model_name_or_path={name_or_path!r} is neither a folder, a timm architecture nor a transformers "
            "model type. Use e.g. 'resnet18' (timm), 'resnet' (transformers) or a save_pretrained folder."
        ) from error
    return AutoModelForImageClassification.from_config(config)


def load_classifier(name_or_path: str, grayscale: bool = True, **kwargs: Any):
    """`AutoModelForImageClassification.from_pretrained` (safetensors only, no remote code; `kwargs` passed on,
    `output_loading_info` included). A grayscale model that hf-ceag published as an RGB one
    (`save_grayscale_as_rgb`) comes back as the 1-channel model it trained, unless `grayscale=False` (it is to
    take colour images)."""
    register_timm_models()  # a saved cifar_resnet56 needs it to load
    loaded = AutoModelForImageClassification.from_pretrained(name_or_path, use_safetensors=True, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if grayscale:
        narrow_to_grayscale(model)
    return loaded


def save_loadable(folder: str, model: nn.Module) -> None:
    """After `save_pretrained` into `folder`: make it load with timm alone (`make_timm_loadable`), and a
    grayscale model take RGB images (`save_grayscale_as_rgb`), so `pipeline` works on image files."""
    make_timm_loadable(folder, model)
    save_grayscale_as_rgb(folder, model)


def _timm_classifier(name, num_labels, id2label, label2id, channels, image_size):
    # Architectures with a fixed input size (ViT, Swin, ...) take img_size; convolutional ones refuse it.
    for model_args in ({"in_chans": channels, "img_size": image_size}, {"in_chans": channels}):
        config = TimmWrapperConfig(
            architecture=name, num_labels=num_labels, id2label=id2label, label2id=label2id, model_args=model_args
        )
        try:
            return TimmWrapperForImageClassification(config)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
    raise AssertionError("unreachable")


def classifier_logits(outputs, model: nn.Module) -> torch.Tensor:
    """The `[batch, num_labels]` logits of a classifier's forward output (a `ModelOutput` or dict with `logits`, a
    tuple whose first item they are, or the tensor itself); a ValueError naming the model class otherwise."""
    if isinstance(outputs, dict):
        if "logits" in outputs:
            return outputs["logits"]
        name = type(model).__name__
        head = name.removesuffix("Model") + "ForImageClassification" if name.endswith("Model") else None
        raise ValueError(
            f"{name} returns {type(outputs).__name__} with {list(outputs.keys())} and no `logits`: hf-ceag prunes "
            "classifiers whose forward returns `logits` of shape [batch, num_labels]. Use the model's "
            "image-classification class (AutoModelForImageClassification"
            + (f", e.g. {head}" if head else "")
            + ") or wrap the model so that its forward returns logits."
        )
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


def from_timm(model: nn.Module, architecture: str, **model_args) -> TimmWrapperForImageClassification:
    """Wrap a bare timm model (its weights copied) so the Trainer can prune, save and reload it."""
    num_classes = model.num_classes
    config = TimmWrapperConfig(architecture=architecture, num_labels=num_classes, model_args=model_args or None)
    wrapped = TimmWrapperForImageClassification(config)
    wrapped.timm_model.load_state_dict(model.state_dict())
    return wrapped


def make_timm_loadable(folder: str, model: nn.Module) -> None:
    """Rewrite a saved `TimmWrapperForImageClassification` folder so `timm.create_model("local-dir:<folder>",
    pretrained=True)` loads it too: weight names without the wrapper's `timm_model.` prefix (transformers
    adds it back on load) and timm's `pretrained_cfg` in `config.json`. No-op for other models.

    transformers builds the image processor of a timm folder (`AutoImageProcessor`, `pipeline`) from that
    `pretrained_cfg`, not from `preprocessor_config.json`: when the folder holds the image processor it was
    trained with, `pretrained_cfg` is made to describe the same preprocessing (`timm_data_config`)."""
    import json

    from safetensors.torch import load_file, save_file

    timm_model = getattr(model, "timm_model", None)
    weights, config_file = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    if timm_model is None or not os.path.isfile(weights) or not os.path.isfile(config_file):
        return
    state = load_file(weights)
    save_file({k.removeprefix("timm_model."): v for k, v in state.items()}, weights, metadata={"format": "pt"})
    with open(config_file) as f:
        config = json.load(f)
    pretrained_cfg = json.loads(json.dumps(dict(getattr(timm_model, "pretrained_cfg", {}) or {}), default=str))
    # Where timm's default weights came from is not where these came from.
    for key in ("url", "hf_hub_id", "tag", "license", "origin_url", "paper_ids", "notes"):
        pretrained_cfg.pop(key, None)
    pretrained_cfg["num_classes"] = model.config.num_labels
    pretrained_cfg.update(timm_data_config(folder) or {})
    config["pretrained_cfg"] = pretrained_cfg
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)


_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes


def timm_data_config(folder: str) -> dict | None:
    """timm's data-config fields (`input_size`, `mean`, `std`, `interpolation`, `crop_pct`, `crop_mode`) for the
    preprocessing of the folder's `preprocessor_config.json`: resize (squash) to its size, rescale to [0, 1],
    normalise; None without one. timm's eval transform built from them gives the same pixel values."""
    import json

    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        processor = json.load(f)
    size, mean, std = processor.get("size"), processor.get("image_mean"), processor.get("image_std")
    if not (isinstance(size, dict) and "height" in size and "width" in size and mean and std):
        return None
    return {
        "input_size": [len(mean), int(size["height"]), int(size["width"])],
        "mean": list(mean),
        "std": list(std),
        "interpolation": _INTERPOLATION.get(processor.get("resample", 2), "bilinear"),
        "crop_pct": 1.0,
        "crop_mode": "squash",  # resize both sides to the size, no crop: what the training transform does
    }
