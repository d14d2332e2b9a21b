"""Image data (data/images.py, data/image_files.py, data/image_batches.py): the three layouts, task=auto, grey and
colour, bit depths, and training augmentation drawn from the loop's rng."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGE_CLASSES, toy_images, write_csv, write_image_folder, write_jsonl
from PIL import Image

from strop.config import load_config
from strop.data.image_batches import POLICIES, augment, collate_images, encode_images
from strop.data.image_files import decode_image, stack_images, to_uint8
from strop.data.images import read_prediction_input
from strop.errors import DataError
from strop.tasks import detect_task, prepare


def cfg_for(train, **extra):
    return load_config(None, [f"data.train={train}", "image.size=32", *[f"{k}={v}" for k, v in extra.items()]])


def write_npz(path, sizes=(("train", 30), ("val", 9), ("test", 12)), colour=False):
    arrays = {}
    for seed, (split, n) in enumerate(sizes):
        images, labels = toy_images(n, seed, colour=colour)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_npz_splits_are_used_as_given(tmp_path):
    cfg = cfg_for(write_npz(tmp_path / "toy.npz"), **{"image.class_names": "[flat,spot,upright]"})
    ds = prepare(cfg)
    assert detect_task(cfg).name == "image_classification" and ds.task == "image_classification"
    # 30 / 9 / 12 images as written (no carving: val and test come from the file); grey stays one channel
    assert {s: len(e) for s, e in ds.splits.items()} == {"train": 30, "validation": 9, "test": 12}
    assert ds.labels == ["flat", "spot", "upright"]
    assert ds.splits["train"].pixels.shape == (30, 32, 32, 1)
    assert ds.splits["test"].labels.tolist() == [0, 1, 2] * 4  # toy_images cycles the classes
    assert ds.splits["test"].sources[3] == f"{tmp_path / 'toy.npz'}:test[3]"


def test_npz_without_class_names_names_classes_by_number(tmp_path):
    ds = prepare(cfg_for(write_npz(tmp_path / "toy.npz")))
    assert ds.labels == ["0", "1", "2"]


def test_folder_per_class_with_carved_splits(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", 30, 1)
    cfg = cfg_for(folder, **{"data.validation_ratio": 0.2, "data.test_ratio": 0.2})
    ds = prepare(cfg)
    assert detect_task(cfg).name == "image_classification"
    assert ds.labels == IMAGE_CLASSES and ds.splits["train"].pixels.shape[1:] == (32, 32, 3)
    # stratified carving: 30 images, 10 per class -> 2 per class in validation and in test (round(10 * 0.2))
    assert [len(ds.splits[s]) for s in ("train", "validation", "test")] == [18, 6, 6]
    assert sorted(np.bincount(ds.splits["validation"].labels).tolist()) == [2, 2, 2]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_table_of_relative_image_paths(tmp_path, kind):
    folder = write_image_folder(tmp_path / "imgs", 12, 2)
    rows = [{"file": str(p.relative_to(tmp_path)), "diagnosis": p.parent.name}
            for p in sorted(folder.rglob("*.png"))]
    table = (write_csv if kind == "csv" else write_jsonl)(tmp_path / f"train.{kind}", rows)
    cfg = cfg_for(table, **{"data.validation_ratio": 0, "data.test_ratio": 0})
    ds = prepare(cfg)
    assert detect_task(cfg).name == "image_classification"
    assert ds.columns.text == "file" and ds.columns.label == "diagnosis" and len(ds.splits["train"]) == 12
    first = np.asarray(Image.open(folder / rows[0]["file"].split("/", 1)[1]).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(ds.splits["train"].pixels[0], first)


def test_a_text_table_is_not_taken_for_images(tmp_path):
    table = write_csv(tmp_path / "t.csv", [{"text": "my image is blurry.png", "label": "a"},
                                           {"text": "fine", "label": "b"}])
    assert detect_task(cfg_for(table)).name != "image_classification"


def test_grey_and_colour_mixed_become_colour():
    grey, colour = np.full((4, 4, 1), 10, np.uint8), np.zeros((4, 4, 3), np.uint8)
    out = stack_images([grey, colour])
    assert out.shape == (2, 4, 4, 3) and out[0].tolist() == np.full((4, 4, 3), 10).tolist()
    # into a grey model: colour by luminance (0.299 R + 0.587 G + 0.114 B of (100, 200, 50) = 153.0)
    assert stack_images([np.full((1, 1, 3), (100, 200, 50), np.uint8)], 1)[0, 0, 0, 0] == 153


def test_sixteen_bit_images_are_stretched_over_their_range(tmp_path):
    # a 12-bit image stored in 16 bits: 0..4095 must span 0..255, not 0..15 as a division by 256 would give
    a = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    assert decode_image(tmp_path / "x.png").tolist() == [[0, 64], [128, 255]]  # round(v * 255 / 4095)
    assert to_uint8(np.full((2, 2), 7.5)).tolist() == [[0, 0], [0, 0]]  # constant: nothing to stretch


def encoded(n=6, augment="light"):
    pixels = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 1)).astype(np.uint8)
    return encode_images(pixels, np.arange(n) % 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), augment)


def test_batches_are_normalised_grey_on_three_channels():
    enc = encoded(augment="none")
    enc.pixels[0, 0, 0, 0], enc.pixels[0, 0, 0, 1] = 255, 0
    batch = collate_images(enc, np.array([0, 1]))
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [0, 1]
    # (255/255 - 0.5) / 0.5 = 1 and (0 - 0.5) / 0.5 = -1, on each of the three channels
    assert batch["pixel_values"][0, :, 0, 0].tolist() == [1.0] * 3
    assert batch["pixel_values"][0, :, 0, 1].tolist() == [-1.0] * 3


def test_augmentation_only_with_the_loops_rng_and_the_same_rng_draws_the_same():
    enc, idx = encoded(), np.arange(6)
    plain = collate_images(enc, idx)["pixel_values"]
    first = collate_images(enc, idx, np.random.default_rng([42, 0, 1, 3]))["pixel_values"]
    again = collate_images(enc, idx, np.random.default_rng([42, 0, 1, 3]))["pixel_values"]
    other = collate_images(enc, idx, np.random.default_rng([42, 0, 1, 4]))["pixel_values"]
    torch.testing.assert_close(first, again, atol=0, rtol=0)  # a resumed run draws what the first run drew
    assert not torch.equal(first, plain) and not torch.equal(first, other)
    # evaluation and prediction pass no rng: the images as they are, whatever image.augment says
    torch.testing.assert_close(collate_images(encoded(augment="none"), idx)["pixel_values"], plain)


def test_augmentation_with_no_change_drawn_is_the_identity():
    x = torch.rand(2, 1, 8, 8)
    still = {"flip": 0.0, "rotate": 0.0, "zoom": (1.0, 1.0), "shift": 0.0, "jitter": 0.0}
    # theta = identity and align_corners=False: grid_sample reads each pixel at its own centre
    torch.testing.assert_close(augment(x.clone(), still, np.random.default_rng(0)), x, atol=1e-6, rtol=0)
    flip = dict(still, flip=1.0)
    torch.testing.assert_close(augment(x.clone(), flip, np.random.default_rng(0)), x.flip(-1), atol=1e-6, rtol=0)
    assert set(POLICIES) == {"none", "light", "strong"}


def test_prediction_input_in_subfolders_that_are_not_classes(tmp_path):
    folder = write_image_folder(tmp_path / "new", 4, 5)
    (folder / "horizontal").rename(folder / "week1")
    raw, ex = read_prediction_input(folder, cfg_for(folder).data, 32, 3, IMAGE_CLASSES, need_label=False)
    assert len(ex) == 4 and ex.labels is None  # predictions need no gold labels: week1/ is only a folder
    assert raw.rows[0]["path"] == "spot/001.png"  # sorted class folders first; the input columns are kept
    with pytest.raises(DataError, match="label 'week1' in the input split is not a class of the training data"):
        read_prediction_input(folder, cfg_for(folder).data, 32, 3, IMAGE_CLASSES, need_label=True)


def test_npz_of_pickled_objects_is_refused_with_the_fix(tmp_path):
    np.savez(tmp_path / "obj.npz", train_images=np.array([np.zeros((2, 2)), None], dtype=object),
             train_labels=np.array([0, 1]))
    with pytest.raises(DataError, match="cannot read the train arrays .* save plain numeric arrays"):
        prepare(cfg_for(tmp_path / "obj.npz"))


@pytest.mark.parametrize("suffix", [".jpg", ".tif", ".bmp", ".png"])
def test_pillow_formats_decode_to_grey_or_colour(tmp_path, suffix):
    colour, _ = toy_images(1, 0)
    Image.fromarray(colour[0]).save(tmp_path / f"c{suffix}")
    Image.fromarray(colour[0]).convert("L").save(tmp_path / f"g{suffix}")
    assert decode_image(tmp_path / f"c{suffix}").shape == (20, 20, 3)
    assert decode_image(tmp_path / f"g{suffix}").shape == (20, 20)
    if suffix != ".jpg":  # lossless formats give the pixels back
        np.testing.assert_array_equal(decode_image(tmp_path / f"c{suffix}"), colour[0])
