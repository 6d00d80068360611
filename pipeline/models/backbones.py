"""Feature-extractor backbones for aligned face crops.

Every backbone takes a float tensor ``[B, C, H, W]`` (C = 3, or 1 for grayscale;
values normalised to about [-1, 1]) and returns a feature map ``[B, F, h, w]``;
``F`` is the module's ``out_channels`` attribute. All backbones here have a total
stride of 16, so a 112×112 input ends at a 7×7 map and 224×224 at 14×14.

* ``smallcnn`` – a fast CPU network (≈0.38 M parameters, ``F = 128``).
* ``resnet18`` / ``resnet34`` / ``resnet50`` – torchvision ResNets adapted to 112
  input the way face-recognition code does it (``F = 512`` / ``512`` / ``2048``).
* ``iresnet18`` / ``iresnet34`` / ``iresnet50`` / ``iresnet100`` – the ArcFace
  "improved ResNet" body (``F = 512``); its BN–Dropout–Flatten–FC–BN output stage
  is the ``bn_dropout_fc_bn`` head in :mod:`pipeline.models.heads`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

# torchvision is imported where a torchvision ResNet is built, not here: importing it pulls in
# torch._dynamo (about 2 s), which every train and embed stage would pay for the default
# smallcnn, which does not need it.

__all__ = [
    "BACKBONES",
    "IResNet",
    "SmallCNN",
    "TorchvisionResNet",
    "available_backbones",
]


def _init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal conv/linear weights, BN weight 1 and bias 0 (in place)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int, act: str = "relu") -> list[nn.Module]:
    pad = kernel // 2 if kernel % 2 else 0
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, pad, bias=False),
        nn.BatchNorm2d(cout),
    ]
    layers.append(nn.PReLU(cout) if act == "prelu" else nn.ReLU(inplace=True))
    return layers


class SmallCNN(nn.Module):
    """Plain conv–BN–ReLU network for CPU training runs; total stride 16.

    Layout for a 112×112 input (defaults ``widths = (32, 64, 128)``, ``depths =
    (0, 1, 2)`` 3×3 convs at each resolution)::

        stem  4×4 s4 conv   C → 32  (patchify)    28×28
        down  2×2 s2 conv  32 → 64,  1 × 3×3      14×14
        down  2×2 s2 conv  64 → 128, 2 × 3×3       7×7

    About 26 M multiply-adds per 112×112 image, 0.38 M parameters. Choices made for
    CPU speed (measured on 2 cores): the non-overlapping 4×4 "patchify" stem avoids
    any 56×56 activation (about 30 % faster than a 3×3 stride-2 stem at equal
    depth), downsampling uses non-overlapping 2×2 stride-2 convolutions, the work
    sits at 14×14 and 7×7 where CPU convolutions are most efficient, and ReLU is
    used instead of PReLU (slow backward pass on CPU). Every stride-s layer floors
    the size: ``[B, C, H, W]`` → ``[B, 128, H//16, W//16]`` (7×7 at 112, 14×14 at
    224).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        depths: tuple[int, ...] = (0, 1, 2),
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {widths} and depths {depths} must have the same length")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], kernel_size=4, stride=4, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        cin = widths[0]
        for i, (cout, depth) in enumerate(zip(widths, depths)):
            if i > 0:
                layers += _conv_bn_act(cin, cout, 2, 2)
            layers += [m for _ in range(depth) for m in _conv_bn_act(cout, cout, 3, 1)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_channels = cin
        _init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, 128, H//16, W//16]``."""
        return self.body(x)


# --------------------------------------------------------------------------- ResNet
_TV_RESNETS = ("resnet18", "resnet34", "resnet50")


def _tv_resnet(name: str) -> Callable[..., nn.Module]:
    import torchvision

    return getattr(torchvision.models, name)


def _load_pretrained_resnet(name: str) -> nn.Module:
    """torchvision ``name`` with its IMAGENET1K_V1 weights, read from the torch hub cache.

    Raises RuntimeError (without touching the network) when the weight file is not
    already in ``$TORCH_HOME/hub/checkpoints``; this machine has no internet access.
    """
    import torchvision

    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not cached.is_file():
        raise RuntimeError(
            f"pretrained ImageNet weights for {name} are not available offline: expected "
            f"{cached} in the torch hub cache (fetch {weights.url} into that folder on a "
            f"machine with internet access, or use pretrained_backbone=False)"
        )
    try:
        return _tv_resnet(name)(weights=weights, progress=False)
    except Exception as exc:  # corrupt or truncated file in the cache
        raise RuntimeError(f"could not load pretrained {name} weights from {cached}: {exc}") from exc


class TorchvisionResNet(nn.Module):
    """torchvision ResNet-18/34/50 adapted to 112×112 face crops; total stride 16.

    Changes from the ImageNet network (built with ``weights=None`` unless pretrained):

    * stem: 3×3 stride-1 convolution (``in_channels`` → 64) + BN + ReLU instead of
      the 7×7 stride-2 convolution, and **no max-pool**;
    * the first block of ``layer1`` gets stride 2 (as in ArcFace's IResNet), with a
      1×1 stride-2 projection shortcut added for BasicBlock networks;
    * ``avgpool`` and ``fc`` are removed (the embedding head replaces them).

    So a 112×112 input goes 112 → 56 (layer1) → 28 → 14 → 7: the output is
    ``[B, 512, 7, 7]`` for resnet18/34 and ``[B, 2048, 7, 7]`` for resnet50
    (``[B, F, 14, 14]`` at 224). With ``pretrained=True`` the 3×3 stem is
    initialised from the centre of the ImageNet 7×7 kernel (summed over RGB for a
    1-channel input); the added layer1 shortcut starts from random weights.
    """

    def __init__(self, name: str, in_channels: int = 3, pretrained: bool = False) -> None:
        super().__init__()
        if name not in _TV_RESNETS:
            raise ValueError(f"unknown torchvision ResNet {name!r}; allowed: {sorted(_TV_RESNETS)}")
        from torchvision.models.resnet import BasicBlock, Bottleneck

        net = _load_pretrained_resnet(name) if pretrained else _tv_resnet(name)(weights=None)

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        if pretrained:
            with torch.no_grad():
                centre = net.conv1.weight[:, :, 2:5, 2:5]
                if in_channels == 1:
                    centre = centre.sum(dim=1, keepdim=True)
                self.conv1.weight.copy_(centre)
        self.bn1 = net.bn1
        self.relu = net.relu

        first = net.layer1[0]
        if isinstance(first, BasicBlock):
            first.conv1.stride = (2, 2)
            if first.downsample is None:
                first.downsample = nn.Sequential(
                    nn.Conv2d(64, 64, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(64)
                )
                _init_conv_bn(first.downsample)
        elif isinstance(first, Bottleneck):
            first.conv2.stride = (2, 2)
            first.downsample[0].stride = (2, 2)
        first.stride = 2
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = 512 * (4 if isinstance(first, Bottleneck) else 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, F, H/16, W/16]`` (rounded up)."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# -------------------------------------------------------------------------- IResNet
class IBasicBlock(nn.Module):
    """IResNet residual block: BN–Conv3×3–BN–PReLU–Conv3×3(stride)–BN, plus shortcut.

    ``[B, cin, H, W]`` → ``[B, cout, H/stride, W/stride]``. No activation after the
    addition (pre-activation style, as in ArcFace).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x) + self.shortcut(x)


IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


class IResNet(nn.Module):
    """ArcFace "improved ResNet" body (Deng et al. 2019), written for this project.

    Stem 3×3 stride-1 conv (``in_channels`` → 64) + BN + PReLU, then four stages of
    :class:`IBasicBlock` with widths 64/128/256/512, each starting with stride 2:
    112 → 56 → 28 → 14 → 7. Output ``[B, 512, H/16, W/16]``. The ArcFace output
    stage (BN–Dropout–Flatten–FC–BN) is the ``bn_dropout_fc_bn`` head.
    """

    def __init__(self, layers: tuple[int, int, int, int], in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.PReLU(64),
        ]
        cin = 64
        for cout, n in zip((64, 128, 256, 512), layers):
            blocks.append(IBasicBlock(cin, cout, stride=2))
            blocks += [IBasicBlock(cout, cout, stride=1) for _ in range(n - 1)]
            cin = cout
        self.body = nn.Sequential(*blocks)
        self.out_channels = cin
        _init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, 512, H/16, W/16]`` (rounded up)."""
        return self.body(x)


# ------------------------------------------------------------------------- registry
def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(
            f"pretrained_backbone=True is not supported for {name!r}: ImageNet weights exist "
            f"only for {sorted(_TV_RESNETS)}"
        )


def _smallcnn(in_channels: int = 3, pretrained: bool = False) -> nn.Module:
    _no_pretrained("smallcnn", pretrained)
    return SmallCNN(in_channels)


def _resnet(name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int = 3, pretrained: bool = False) -> nn.Module:
        return TorchvisionResNet(name, in_channels, pretrained)

    build.__name__ = name
    return build


def _iresnet(name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int = 3, pretrained: bool = False) -> nn.Module:
        _no_pretrained(name, pretrained)
        return IResNet(IRESNET_LAYERS[name], in_channels)

    build.__name__ = name
    return build


#: name → constructor ``(in_channels: int = 3, pretrained: bool = False) -> nn.Module``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": _smallcnn,
    **{name: _resnet(name) for name in _TV_RESNETS},
    **{name: _iresnet(name) for name in IRESNET_LAYERS},
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`pipeline.models.build_model`, sorted."""
    return sorted(BACKBONES)
