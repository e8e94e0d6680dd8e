"""bf16 autocast on a CPU without NaN gradients from oneDNN's strided convolutions on 1×1 inputs.

torch's CPU backend (oneDNN, measured on torch 2.14.1) computes the weight gradient of a bf16 convolution with a
stride larger than its 1×1 input (e.g. a 3×3, stride-2, padding-1 convolution in the last stage of a small ResNet
at 16 px) with garbage in the kernel taps that only ever see padding: in about one backward pass in four, some
are NaN. Their true gradient is zero, but gradient clipping spreads one NaN to every weight, and the run is lost
(the default recipe's test_resnet at 16 px died within the first ten steps of dense training under `--bf16 true`).
The same convolution in fp32 is exact, and on a 1×1 input it costs next to nothing, so only those calls leave
autocast.
"""

from __future__ import annotations

import torch
from torch import nn


class CpuBf16SafeConv2d(nn.Conv2d):
    """A `Conv2d` that runs in fp32, outside CPU autocast, on inputs smaller than its stride (the shapes whose
    bf16 weight gradient oneDNN gets wrong); in bf16 like any `Conv2d` everywhere else."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            _smaller_than_stride(input, self.stride)
            and input.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(input.float())
        return super().forward(input)


def _smaller_than_stride(input: torch.Tensor, stride: tuple[int, int]) -> bool:
    return any(size < step for size, step in zip(input.shape[-2:], stride))


def protect_cpu_bf16_convolutions(model: nn.Module) -> list[str]:
    """Make every strided `nn.Conv2d` of `model` a `CpuBf16SafeConv2d` (in place: same weights, same state dict,
    still an `nn.Conv2d`), and return their names. Call it on a model that will train under bf16 autocast on a
    CPU; it changes nothing in fp32 or on an accelerator."""
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and max(module.stride) > 1:
            module.__class__ = CpuBf16SafeConv2d
            names.append(name)
    return names


def protect_for_cpu_bf16(model: nn.Module, args) -> nn.Module:
    """`model`, ready to train under `args` (`TrainingArguments`): under bf16 autocast on a CPU, its strided
    convolutions compute in fp32 where oneDNN's bf16 weight gradient would be NaN; unchanged otherwise."""
    from ..ceag_config import has_accelerator

    if model is not None and args.bf16 and (args.use_cpu or not has_accelerator()):
        protect_cpu_bf16_convolutions(model)
    return model
