"""DICOM images: rescale and window applied as a viewer would, MONOCHROME1 inverted, files without pixels or with
several frames refused with the fix, patient tags never in what a run writes or prints."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import DICOM_PATIENT as PATIENT
from conftest import write_dicom
from test_image_classification import overrides

import strop

from strop.data.dicom import decode_dicom
from strop.data.image_files import ImageReader
from strop.errors import DataError

def test_rescale_then_window_as_a_viewer_shows_it(tmp_path):
    # stored 0..3, slope 50, intercept -50 -> -50, 0, 50, 100 (e.g. Hounsfield units); window center 50, width
    # 101 covers [-0.5, 99.5]: PS3.3's linear function, 255 * (0.5 + (x - 49.5) / 100) clipped to [0, 255], gives
    # 0, 1.275, 128.775, 255
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=50, RescaleIntercept=-50, WindowCenter=50,
                       WindowWidth=101)
    expected = np.array([[0, 1], [129, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_dicom(path), expected)


def test_without_a_window_the_range_is_stretched_and_monochrome1_inverted(tmp_path):
    stored = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    plain = decode_dicom(write_dicom(tmp_path / "a.dcm", stored))
    # (x - 1000) * 255 / 4000: 0, 63.75, 127.5, 255 -> rounded half to even as numpy does
    np.testing.assert_array_equal(plain, np.array([[0, 64], [128, 255]], dtype=np.uint8))
    inverted = decode_dicom(write_dicom(tmp_path / "b.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_colour_dicom_comes_back_as_rgb(tmp_path):
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[1, 2] = 200, (10, 20, 30)
    out = decode_dicom(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB"))
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("case, words", [("nopixels", "no pixel data"), ("frames", "holds 3 frames")])
def test_dicom_without_one_picture_is_refused_with_the_fix(tmp_path, case, words):
    if case == "nopixels":
        path = write_dicom(tmp_path / "report.dcm", None)
    else:
        path = write_dicom(tmp_path / "cine.dcm", np.zeros((3, 4, 4), dtype=np.uint8), NumberOfFrames=3)
    with pytest.raises(DataError) as err:
        ImageReader(8).read(path)
    assert words in str(err.value) and str(path) in str(err.value)
    assert PATIENT not in str(err.value) and "MRN-0042" not in str(err.value)
    reader = ImageReader(8, on_bad="skip")
    assert reader.read(path) is None and reader.skipped == [str(path)]


def test_a_folder_of_dicom_classes_trains_and_no_patient_tag_reaches_the_run(tiny_vision_model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "dcm"
    for label, bright in (("normal", 0), ("finding", 1)):
        (root / label).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 400, (12, 12)).astype(np.uint16)
            pixels[3:9, 3:9] += 3000 * bright
            write_dicom(root / label / f"{i}.dcm", pixels)
    run = strop.train(None, overrides(tiny_vision_model, tmp_path, {"train": str(root)}, **{"train.epochs": 1}))
    assert run.results["steps"] == 2  # 1 epoch of 14 training images (2 carved off for validation) in batches of 8
    written = "".join(p.read_text(errors="ignore") for p in run.run_dir.rglob("*")
                      if p.is_file() and p.suffix in (".json", ".yaml", ".log", ".txt", ".jsonl", ".csv", ".html"))
    out = capsys.readouterr()
    for text in (written, out.out, out.err):
        assert PATIENT not in text and "MRN-0042" not in text
