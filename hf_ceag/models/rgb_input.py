"""A grayscale (1-channel) image classifier published as one that takes RGB images.

transformers' `pipeline` (like most image tooling) converts PIL images and image files to RGB before its image
processor sees them, so a saved 1-channel model fails on them. hf-ceag therefore saves such a model with a
3-channel first layer whose weights are the 1-channel ones times `GREY_WEIGHTS` (1/4, 1/2, 1/4), and its image
processor normalises the three channels alike:

* on a grey image (R = G = B, what `pipeline` makes of a grayscale one) the layer computes what the 1-channel layer
  computed, up to float rounding; on a colour image it sees the grey level (R + 2G + B) / 4;
* the green weights are exactly half the trained ones, so `narrow_to_grayscale` gets the 1-channel model back bit
  for bit (`load_classifier` does it for every folder hf-ceag loads, `CEAGTrainer` for a model given 1-channel data).

`config.json` records the widened layer under `RGB_INPUT_KEY`. Checkpoints are saved as trained (1 channel), so a
resume loads them as they are.
"""

from __future__ import annotations

import json
import os
from typing import Any

import datasets
import torch
from torch import nn

GREY_WEIGHTS = (0.25, 0.5, 0.25)  # sums to 1; the middle one a power of two (exact round trip)
RGB_INPUT_KEY = "hf_ceag_rgb_input"


def input_channels(config: Any) -> int | None:
    """The number of image channels a model's config says it takes (transformers `num_channels`, timm
    `model_args.in_chans`; None when it says nothing)."""
    channels = getattr(config, "num_channels", None)
    if channels is None:
        model_args = getattr(config, "model_args", None) or {}
        channels = model_args.get("in_chans", 3 if getattr(config, "architecture", None) else None)
    return channels


def _set_input_channels(config: Any, channels: int) -> None:
    if getattr(config, "num_channels", None) is not None:
        config.num_channels = channels
    else:
        config.model_args = {**(getattr(config, "model_args", None) or {}), "in_chans": channels}


def grayscale_stem(model: nn.Module) -> str | None:
    """The name of the layer that takes a 1-channel model's images: its only `Conv2d` with one input channel.
    None when the model takes more channels, or when that layer is not unique (it is then saved as it is)."""
    if input_channels(getattr(model, "config", None)) != 1:
        return None
    stems = [
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 1 and m.groups == 1
    ]
    return stems[0] if len(stems) == 1 else None


def _repeat_normalisation(values: dict[str, Any], mean_key: str, std_key: str) -> None:
    for key in (mean_key, std_key):
        value = values.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 1:
            values[key] = list(value) * 3


def save_grayscale_as_rgb(folder: str, model: nn.Module) -> bool:
    """Rewrite the saved folder of a 1-channel `model` (after `save_pretrained` and `make_timm_loadable`) so that
    it takes RGB images: the widened first layer in `model.safetensors`, three channels in `config.json` (timm's
    `pretrained_cfg` too) and in `preprocessor_config.json`. Returns whether it rewrote anything."""
    from safetensors.torch import load_file, save_file

    from .saved_weights import saved_parameter_names

    stem = grayscale_stem(model)
    weights, config_file = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    if stem is None or not os.path.isfile(weights) or not os.path.isfile(config_file):
        return False
    name = f"{stem}.weight"
    key = saved_parameter_names(weights, {name: model.get_submodule(stem).weight}).get(name)
    state = load_file(weights)
    if key not in state or state[key].shape[1] != 1:
        return False
    grey = state[key]
    state[key] = torch.cat([grey * factor for factor in GREY_WEIGHTS], dim=1).contiguous()
    save_file(state, weights, metadata={"format": "pt"})

    with open(config_file) as f:
        config = json.load(f)
    if "num_channels" in config:
        config["num_channels"] = 3
    else:
        config["model_args"] = {**(config.get("model_args") or {}), "in_chans": 3}
    pretrained_cfg = config.get("pretrained_cfg")
    if isinstance(pretrained_cfg, dict):
        if isinstance(pretrained_cfg.get("input_size"), list):
            pretrained_cfg["input_size"] = [3, *pretrained_cfg["input_size"][1:]]
        _repeat_normalisation(pretrained_cfg, "mean", "std")
    config[RGB_INPUT_KEY] = {"module": stem, "grey_weights": list(GREY_WEIGHTS)}
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)

    processor_file = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(processor_file):
        with open(processor_file) as f:
            processor = json.load(f)
        _repeat_normalisation(processor, "image_mean", "image_std")
        processor["do_convert_rgb"] = True  # a grey image given to the processor becomes the RGB image it takes
        with open(processor_file, "w") as f:
            json.dump(processor, f, indent=2)
    return True


def narrow_to_grayscale(model: nn.Module) -> nn.Module:
    """The 1-channel model a folder written by `save_grayscale_as_rgb` was trained as (in place, bit for bit: the
    green weights doubled); any other model, or one trained further as an RGB model, is returned unchanged.
    (In float16, a weight below 2⁻¹³ halved loses a bit: such a model stays as saved.)"""
    config = getattr(model, "config", None)
    record = getattr(config, RGB_INPUT_KEY, None)
    if not isinstance(record, dict):
        return model
    try:
        stem = model.get_submodule(record["module"])
    except AttributeError:  # another architecture than the one the record names
        return model
    factors = [float(f) for f in record["grey_weights"]]
    with torch.no_grad():
        grey = (stem.weight[:, 1:2] / factors[1]).contiguous()
        widened = torch.cat([grey * f for f in factors], dim=1)
    if widened.shape != stem.weight.shape or not torch.equal(widened, stem.weight):
        # trained further as an RGB model (its channels no longer the grey weights' multiples): keep it so
        return model
    stem.weight.data = grey  # the same Parameter: an optimizer built on the model still holds it
    stem.in_channels = 1
    # transformers' embeddings check the channels of their input (`num_channels`): the stem's ancestors
    path = record["module"].split(".")
    for depth in range(len(path)):
        owner = model.get_submodule(".".join(path[:depth])) if depth else model
        if getattr(owner, "num_channels", None) == 3:
            owner.num_channels = 1
    timm_model = getattr(model, "timm_model", None)
    pretrained_cfg = getattr(timm_model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("input_size"):
        pretrained_cfg["input_size"] = (1, *tuple(pretrained_cfg["input_size"])[1:])
        for key in ("mean", "std"):
            if isinstance(pretrained_cfg.get(key), (list, tuple)) and len(pretrained_cfg[key]) == 3:
                pretrained_cfg[key] = tuple(pretrained_cfg[key])[:1]
    _set_input_channels(config, 1)
    delattr(config, RGB_INPUT_KEY)
    return model


def narrow_for_grayscale_data(model: nn.Module, dataset: Any) -> nn.Module:
    """A published grayscale model (`save_grayscale_as_rgb`) given a dataset of 1-channel images: back to the
    1-channel model it was trained as (`narrow_to_grayscale`), so it fine-tunes as it trained; else unchanged."""
    if not isinstance(getattr(getattr(model, "config", None), RGB_INPUT_KEY, None), dict) or dataset is None:
        return model
    try:
        row = next(iter(dataset.take(1))) if isinstance(dataset, datasets.IterableDataset) else dataset[0]
        pixel_values = row["pixel_values"]
    except (KeyError, IndexError, TypeError, StopIteration):
        return model
    if torch.as_tensor(pixel_values).ndim == 3 and torch.as_tensor(pixel_values).shape[0] == 1:
        narrow_to_grayscale(model)
    return model
