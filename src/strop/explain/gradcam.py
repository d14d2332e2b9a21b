"""Grad-CAM (Selvaraju et al. 2017) for convolutional image classifiers: where in the image a layer's
features pushed the model toward a class.

For the logit y_c of class c and the K feature maps A_k (h x w) of a layer, alpha_k = the mean over the
map of dy_c/dA_k, and CAM = ReLU(sum_k alpha_k A_k). The layer is the last of the model's `cam_layers()`
(each stage's end, then the last 1x1 convolution) whose map is at least 2x2 at the input's size: the last
stages hold the features the classifier reads, but a 1x1 map (EfficientNet-Lite0's last two stages at
28 px) cannot say where anything is.

Written here rather than taken from pytorch-grad-cam, which imports torchvision and OpenCV: a torchvision
built for torch 2.13 cannot be installed beside it without replacing torch (DECISIONS.md). The method is a
forward hook that keeps each candidate map, and one `torch.autograd.grad` of the class logits with respect
to the chosen map; only the maps' gradient is taken, so the weights' `.grad` are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strop.errors import StropError


@dataclass(frozen=True)
class CamLayer:
    """The layer a CAM was read at: its name in the model and its feature map's shape."""

    name: str
    channels: int
    height: int
    width: int

    def describe(self) -> str:
        return f"{self.name} ({self.height}x{self.width} map, {self.channels} channels)"


@dataclass
class CamResult:
    """cams: (n, h, w) float32 >= 0 at the layer's resolution (not normalised); logits: (n, num_labels)
    float32; targets: (n,) the class each CAM explains."""

    cams: torch.Tensor
    layer: CamLayer
    logits: torch.Tensor
    targets: torch.Tensor


def cam_layers_of(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's candidate layers in forward order (a PEFT wrapper passes the call to its model)."""
    layers = getattr(model, "cam_layers", None)
    if layers is None:
        raise StropError(f"Grad-CAM needs a convolutional model that names its stages (cam_layers()); "
                         f"{type(model).__name__} does not")
    return list(layers())


def pick_layer(shapes: list[tuple[str, torch.Size]]) -> CamLayer:
    """The last (name, (n, C, h, w)) whose map is at least 2x2."""
    for name, shape in reversed(shapes):
        if shape[-2] >= 2 and shape[-1] >= 2:
            return CamLayer(name, int(shape[1]), int(shape[-2]), int(shape[-1]))
    sizes = ", ".join(f"{n} {s[-2]}x{s[-1]}" for n, s in shapes)
    raise StropError(f"no layer of this model has a feature map of at least 2x2 at this image size "
                     f"({sizes}), so Grad-CAM cannot say where; train at a larger image.size")


def grad_cam(model, pixel_values: torch.Tensor, target: int | torch.Tensor | None = None) -> CamResult:
    """Grad-CAM of a batch. pixel_values: (n, 3, H, W) float, normalised as the model expects; target: the
    class to explain, one for all, (n,) one per image, or None for each image's predicted class. The model
    runs in eval mode (batch norm from its running statistics, so each image's CAM is its own) and is left
    as it was."""
    layers = cam_layers_of(model)
    maps: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, output: maps.__setitem__(name, output)

    hooks = [module.register_forward_hook(keep(name)) for name, module in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # the input asks for gradients, so every map is in the graph even when all weights are frozen
            x = pixel_values.detach().float().requires_grad_(True)
            logits = model(pixel_values=x).logits.float()
            layer = pick_layer([(name, maps[name].shape) for name, _ in layers])
            targets = _targets(target, logits)
            # one gradient for the whole batch: in eval mode image i's logit depends on its own maps only
            chosen = logits.gather(1, targets.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(chosen, maps[layer.name])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    alpha = grad.float().mean((2, 3), keepdim=True)  # (n, K, 1, 1): each channel's weight for the class
    cams = torch.relu((alpha * maps[layer.name].detach().float()).sum(1))
    return CamResult(cams, layer, logits.detach(), targets)


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return torch.as_tensor(target, dtype=torch.long, device=logits.device).view(-1)
