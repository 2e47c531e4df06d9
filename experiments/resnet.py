"""ResNet-18 with torchvision's architecture, written with ``torch.nn`` only.

The module names (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``) and the
initialization match ``torchvision.models.resnet18(num_classes=...)``, so a state
dict loads into either (11,181,642 weights for 10 classes). It is here because
torchvision wheels are built against one torch release and the project's venv may
hold another; nothing is downloaded.

On CIFAR-shaped ``[N, 3, 32, 32]`` inputs the ImageNet stem (7x7 stride-2 conv and
max-pool) leaves 8x8 maps for ``layer1`` and 1x1 maps for ``layer4``, as a user
gets who calls torchvision's model on CIFAR images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and the residual connection.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (and of the 1x1 projection, if any).
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``[N, inplanes, H, W] -> [N, planes, H / stride, W / stride]``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18``: stem, four stages of two blocks, pooled linear head.

    Args:
        num_classes: Outputs of the head ``fc``.
        seed: Fixes the initialization (torch's global generator is left untouched).
    """

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths, inplanes = (64, 128, 256, 512), 64
        for index, planes in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            stage = nn.Sequential(
                BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)
            )
            self.add_module(f"layer{index}", stage)
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._initialize()

    def _initialize(self) -> None:
        """Torchvision's initialization: He (fan-out) convs, unit BatchNorm."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu"
                )
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                module.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, 3, H, W]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, inputs: Tensor, batch_size: int = 64) -> None:
    """Set every BatchNorm's running statistics to their mean over ``inputs``.

    A random-init network in eval mode with the default statistics (mean 0,
    variance 1) lets activations grow through the residual stages; one pass in
    training mode with a cumulative average (``momentum=None``) gives the
    statistics a trained network would have on this data. The model is left in
    eval mode.

    Args:
        model: The network (changed in place).
        inputs: ``[N, ...]`` inputs.
        batch_size: Inputs per forward pass.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for batch in torch.split(inputs, batch_size):
        model(batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()
