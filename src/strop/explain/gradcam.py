"""Grad-CAM (Selvaraju et al. 2017) for convolutional image classifiers: where in the image a layer's
features pushed the model toward a class.

For the logit y_c of class c and the K feature maps A_k (h x w) of a layer, alpha_k = the mean over the
map of dy_c/dA_k, and CAM = ReLU(sum_k alpha_k A_k). The layer is the last candidate whose map is at least
2x2 at the input's size: the last stages hold the features the classifier reads, but a 1x1 map
(EfficientNet-Lite0's last two stages at 28 px) cannot say where anything is.

One mechanism finds the candidates of any supported model (`feature_maps`): a model that names its layers
(`cam_layers()`: strop's EfficientNet-Lite, each stage's end and the last 1x1 convolution) gives those
layers' outputs; a Hugging Face image classifier gives its hidden states (`output_hidden_states`): a CNN's
(ConvNeXt, ResNet) stage maps as they are, a vision transformer's tokens laid back on the patch grid
(`token_grid`, the usual ViT Grad-CAM). A class token reads the image through attention, so the last
block's output patch tokens never reach the logit (their gradient is zero): with a class token the last
state is left out and the CAM is read at the last block's input.

Written here rather than taken from pytorch-grad-cam, which imports torchvision and OpenCV: a torchvision
built for torch 2.13 cannot be installed beside it without replacing torch (DECISIONS.md). The maps are
kept from one forward pass, and one `torch.autograd.grad` of the class logits is taken with respect to the
chosen map; only the maps' gradient is taken, so the weights' `.grad` are never touched.
"""

from __future__ import annotations

import math
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


def feature_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """(logits (n, num_labels) float, candidates (name, tensor) in forward order, still in the autograd
    graph: (n, C, h, w) maps or (n, tokens, D) token sequences, `as_map` lays both out as maps) of
    pixel_values x (n, 3, H, W). A PEFT wrapper passes both kinds of call to its model."""
    if getattr(model, "cam_layers", None) is not None:
        return named_layer_maps(model, x)
    return hidden_state_maps(model, x)


def named_layer_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The outputs of the layers `model.cam_layers()` names, kept by forward hooks."""
    layers, maps = list(model.cam_layers()), {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: maps.__setitem__(name, out))
             for name, m in layers]
    try:
        logits = model(pixel_values=x).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, [(name, maps[name]) for name, _ in layers]


def hidden_state_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """A Hugging Face model's hidden states that are maps or square grids of patch tokens."""
    try:
        out = model(pixel_values=x, output_hidden_states=True)
    except TypeError:  # neither named layers nor transformers' hidden states
        raise StropError(f"Grad-CAM needs a model that names its stages (cam_layers()) or gives its "
                         f"hidden states (a transformers image classifier); {type(model).__name__} does "
                         "neither") from None
    states = list(getattr(out, "hidden_states", None) or [])
    found, prefixed = [], False
    for i, h in enumerate(states):
        if h.dim() == 4 or (h.dim() == 3 and token_grid(h.shape[1]) is not None):
            prefixed = prefixed or (h.dim() == 3 and token_grid(h.shape[1])[0] > 0)
            found.append((f"hidden_states.{i}", h))
    if prefixed and found and found[-1][0] == f"hidden_states.{len(states) - 1}":
        found.pop()  # the class token read the image: the last state's patch tokens never reach the logit
    if not found:
        raise StropError(f"Grad-CAM needs a feature map: {type(model).__name__} gives no hidden states that "
                         "are spatial maps or square grids of patch tokens")
    return out.logits.float(), found


def token_grid(tokens: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) of a square image's token sequence: g x g patch tokens after a few class /
    distillation / register tokens (fewer than a row of the grid); None when `tokens` is no such sequence."""
    side = math.isqrt(tokens)
    prefix = tokens - side * side
    return (prefix, side) if side >= 1 and prefix < side else None


def as_map(t: torch.Tensor) -> torch.Tensor:
    """A candidate (or its gradient) as a map (n, C, h, w): maps as they are; (n, prefix + g*g, D) tokens as
    (n, D, g, g), the patch tokens on their grid (row-major, the order they were cut from the image)."""
    if t.dim() == 4:
        return t
    prefix, side = token_grid(t.shape[1])
    return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)


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
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # the input asks for gradients, so every map is in the graph even when all weights are frozen
            x = pixel_values.detach().float().requires_grad_(True)
            logits, found = feature_maps(model, x)
            layer = pick_layer([(name, as_map(t).shape) for name, t in found])
            chosen_map = dict(found)[layer.name]
            targets = _targets(target, logits)
            # one gradient for the whole batch: in eval mode image i's logit depends on its own maps only
            chosen = logits.gather(1, targets.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(chosen, chosen_map)
    finally:
        model.train(was_training)
    alpha = as_map(grad).float().mean((2, 3), keepdim=True)  # (n, K, 1, 1): each channel's weight
    cams = torch.relu((alpha * as_map(chosen_map.detach()).float()).sum(1))
    return CamResult(cams, layer, logits.detach(), targets)


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return torch.as_tensor(target, dtype=torch.long, device=logits.device).view(-1)
