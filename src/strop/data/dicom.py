"""One DICOM file (.dcm) -> the picture a radiologist sees, as uint8 pixels (pydicom, the `vision` extra).

Stored values are not what a viewer shows: the modality LUT (RescaleSlope / RescaleIntercept; CT's Hounsfield
units) turns them into physical values, and the file's window (WindowCenter / WindowWidth, the first when it lists
several) picks the range shown, mapped to 0..255 by the standard's linear function (PS3.3 C.11.2.1.2.1); a file
without a window is stretched over its own range. MONOCHROME1 stores dark as high values, so it is inverted.

Only pixels leave this module: patient tags (name, ID, birth date, ...) are never read, logged or kept, and the
errors raised here name the file and the fix, never a tag's value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from strop.errors import DataError


def pydicom():
    try:
        import pydicom as module
    except ImportError:
        raise DataError("reading DICOM (.dcm) files needs pydicom: pip install 'strop[vision]'") from None
    return module


def first(value) -> float:
    """A DICOM number that may be multi-valued (several windows): its first value."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Physical values -> uint8 through the window (center, width): PS3.3's linear VOI function, where values
    below center - 0.5 - (width - 1) / 2 are black and above center - 0.5 + (width - 1) / 2 white."""
    span = max(width - 1.0, 1.0)  # a width of 1 (a hard threshold) would divide by zero
    y = ((values - (center - 0.5)) / span + 0.5) * 255.0
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def stretch(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def is_dicom_bytes(data: bytes) -> bool:
    """Whether bytes in memory are a DICOM file: 'DICM' after the 128-byte preamble (PS3.10 7.1)."""
    return data[128:132] == b"DICM"


def dicom_size(source: Path | BinaryIO) -> tuple[int, int]:
    """(width, height) the header declares (Columns, Rows), read without the pixel data: what a size limit checks
    before anything is decoded."""
    ds = pydicom().dcmread(source, stop_before_pixels=True)
    return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)


def decode_dicom(source: Path | BinaryIO) -> np.ndarray:
    """(H, W) uint8 for grey images, (H, W, 3) for colour ones, from a path or an open binary file. Raises
    ValueError (a file without pixel data, several frames) or pydicom's errors (not DICOM, a compressed syntax
    without its decoder installed)."""
    module = pydicom()
    ds = module.dcmread(source)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError("the DICOM file has no pixel data (a report or a series header, not an image); remove "
                         "it from the data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"the DICOM file holds {frames} frames (a volume or a cine loop); strop classifies 2-D "
                         "images: save the frame(s) you want as separate files")
    pixels = ds.pixel_array  # colour (RGB / YBR) comes back as RGB
    if pixels.ndim == 3:
        return np.ascontiguousarray(pixels[..., :3]).astype(np.uint8) if pixels.dtype == np.uint8 \
            else stretch(pixels[..., :3].astype(np.float64))
    values = module.pixels.apply_modality_lut(pixels, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        out = window(values, first(ds.WindowCenter), first(ds.WindowWidth))
    else:
        out = stretch(values)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    return out
