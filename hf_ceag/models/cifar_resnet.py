"""CIFAR-style ResNet-56 (He et al. 2016, §4.2), registered with timm as `cifar_resnet56`.

timm has no CIFAR ResNets: its ResNets start with a 7×7 stride-2 stem and a max-pool, which leaves a 32×32 image
at 8×8 before the first block. This one has a 3×3 stride-1 stem and three stages of 9 basic blocks with 16, 32
and 64 channels (strides 1, 2, 2); a stage that halves the resolution uses the parameter-free shortcut of the
paper (option A: subsample, then zero-pad the new channels), so the network has exactly 1 + 2·27 = 55
convolutions and one linear layer (0.85 M parameters with 10 classes).

`register_timm_models()` registers the architecture with timm (importing this module does not), after which
every timm/transformers entry point knows it; `hf_ceag.build_classifier` calls it:

    hf_ceag.register_timm_models()
    model = hf_ceag.build_classifier("cifar_resnet56", num_labels=100)      # TimmWrapperForImageClassification
    model = AutoModelForImageClassification.from_pretrained("outputs/cifar100/ceag")  # a saved one

A saved `cifar_resnet56` folder therefore needs that call (hence hf_ceag installed) to load; the timm
architectures (`mobilenetv2_100`, `resnet34`, ...) do not.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet", "cifar_resnet56", "register_timm_models"]

CIFAR100_MEAN, CIFAR100_STD = (0.507, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride = stride
        self.pad_channels = channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A of the paper: no parameters, so the conv count stays 2 per block.
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            half = self.pad_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet with `len(widths)` stages of `depth_per_stage` basic blocks (ResNet-(6n+2) for n blocks).

    Follows the timm model interface that `TimmWrapperForImageClassification` uses: `forward_features`,
    `forward_head(x, pre_logits=False)`, `num_features`, `num_classes` (0 = no classifier),
    `get_classifier` / `reset_classifier`.
    """

    def __init__(
        self,
        depth_per_stage: int = 9,
        widths: tuple[int, ...] = (16, 32, 64),
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth_per_stage < 1 or not widths:
            raise ValueError(f"depth_per_stage={depth_per_stage} must be >= 1 and widths={widths} non-empty.")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv_stem = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for block in range(depth_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": w, "reduction": 2**i, "module": f"stages.{i}"} for i, w in enumerate(widths)
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map `[batch, num_features, H/4, W/4]`."""
        x = F.relu(self.bn_stem(self.conv_stem(x)))
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, dropout, classifier (skipped with `pre_logits` or `num_classes=0`)."""
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet56": {
            "num_classes": 100,
            "input_size": (3, 32, 32),
            "pool_size": (8, 8),
            "mean": CIFAR100_MEAN,
            "std": CIFAR100_STD,
            "first_conv": "conv_stem",
            "classifier": "fc",
        }
    }
)


def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for 32×32 inputs: 3 stages × 9 basic blocks, 16/32/64 channels (no pretrained weights)."""
    if pretrained:
        raise ValueError(
            "cifar_resnet56 has no pretrained weights: build it with pretrained=False, or load your own "
            "save_pretrained folder with AutoModelForImageClassification.from_pretrained."
        )
    kwargs.pop("pretrained_cfg_overlay", None)
    return build_model_with_cfg(CifarResNet, "cifar_resnet56", pretrained=False, depth_per_stage=9, **kwargs)


def register_timm_models() -> None:
    """Register hf-ceag's extra architectures (`cifar_resnet56`) with timm; calling it again does nothing."""
    if not timm.is_model("cifar_resnet56"):
        register_model(cifar_resnet56)
