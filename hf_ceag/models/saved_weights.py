"""The names under which `save_pretrained` wrote a model's parameters into its weights file."""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import safe_open


def saved_parameter_names(weights_file: str, parameters: dict[str, Any]) -> dict[str, str]:
    """Map each of `parameters` (name: tensor) to the key under which `save_pretrained` wrote it in
    `weights_file` (transformers 5 renames some architectures' weights on save, e.g. ViT's; hf-ceag drops timm's
    `timm_model.` prefix): the key of the only stored tensor with the same values. Names without such a key
    (a fused or sharded save) are kept."""
    if not os.path.isfile(weights_file):
        return {}
    names = {}
    with safe_open(weights_file, framework="pt") as stored:
        by_shape: dict[tuple, list[str]] = {}
        for key in stored.keys():  # noqa: SIM118 (safe_open is not a dict)
            by_shape.setdefault(tuple(stored.get_slice(key).get_shape()), []).append(key)
        for name, tensor in parameters.items():
            value = tensor.detach().cpu()
            same = [k for k in by_shape.get(tuple(value.shape), []) if torch.equal(stored.get_tensor(k), value)]
            if len(same) > 1:  # equal tensors (e.g. all zeros): the key that keeps the most of the name
                same = [k for k in same if k.endswith(name.split(".", 1)[-1])] or same[:0]
            if len(same) == 1:
                names[name] = same[0]
    return names
