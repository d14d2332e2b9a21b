"""One image -> a uint8 array of the model's input size: decoding through Pillow, bit depths, channels, resizing.

Files: PNG, JPEG, TIFF, BMP (what Pillow reads) and DICOM (.dcm, data/dicom.py); the suffixes below are what
the folder and table layouts look for. Each image is decoded completely when read, so a truncated or corrupt file is found before training starts,
and resized to size x size at once, so memory holds size^2 pixels per image whatever the files hold.
Grey stays one channel and colour three until a dataset's images are stacked (`stack_images`): a dataset that
holds both is colour, its grey images repeated over three channels (the same picture).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from strop.data.dicom import decode_dicom, dicom_size, is_dicom_bytes
from strop.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError("reading images needs Pillow: pip install 'strop[vision]'") from None
    return Image, ImageOps


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Pixels of any depth -> uint8. 8-bit stays as it is; deeper or float images are stretched from their own
    minimum to maximum (a 12-bit X-ray in a 16-bit PNG uses 0..4095, so dividing by 256 would leave it near black;
    a DICOM's own window is applied in data/dicom.py instead)."""
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def decode_image(path: Path) -> np.ndarray:
    """The file's pixels: (H, W) uint8 for grey images, (H, W, 3) for colour (alpha dropped, palettes expanded,
    EXIF rotation applied; DICOM through its rescale and window, data/dicom.py). Raises OSError / ValueError
    (Pillow's, pydicom's) for files it cannot read completely."""
    if path.suffix.lower() == ".dcm":
        return decode_dicom(path)
    Image, _ = pillow()
    with Image.open(path) as img:
        return opened_pixels(img)


def opened_pixels(img) -> np.ndarray:
    """The pixels of an image Pillow has opened (its header read, nothing decoded yet), as decode_image gives."""
    _, ImageOps = pillow()
    img.load()  # decodes everything: a truncated file fails here, not during training
    img = ImageOps.exif_transpose(img)
    if img.mode in GREY_MODES:
        if img.mode in ("1", "LA"):
            img = img.convert("L")
        return to_uint8(np.asarray(img))
    return np.asarray(img.convert("RGB"))


class TooManyPixels(DataError):
    """An image whose header declares more pixels than allowed; raised before any pixel is decoded."""

    def __init__(self, limit: int, size: tuple[int, int] | None = None, pillow_limit: int | None = None):
        declared = f"is {size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else \
            f"declares over {pillow_limit} pixels (Pillow's decompression-bomb limit)"
        super().__init__(f"the image {declared}; the limit is {limit} pixels")
        self.limit, self.size = limit, size


def decode_image_bytes(data: bytes, max_pixels: int) -> np.ndarray:
    """The pixels of an image file held in memory (an upload), as decode_image gives them. The size its header
    declares is checked against max_pixels before anything is decoded (Image.open reads only the header), so a
    small file declaring a huge image (a decompression bomb) costs no memory. Raises TooManyPixels, or Pillow's
    OSError / ValueError / SyntaxError for bytes it cannot decode completely."""
    if is_dicom_bytes(data):  # DICOM: the header's Rows x Columns checked before the pixel data is read
        width, height = dicom_size(io.BytesIO(data))
        if width * height > max_pixels:
            raise TooManyPixels(max_pixels, (width, height))
        return decode_dicom(io.BytesIO(data))
    Image, _ = pillow()
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # over twice Image.MAX_IMAGE_PIXELS: Pillow refuses in open itself
        raise TooManyPixels(max_pixels, pillow_limit=2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise TooManyPixels(max_pixels, (width, height))
        return opened_pixels(img)


def as_array(image) -> np.ndarray:
    """An image given in memory (a numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or a PIL image) ->
    (H, W) or (H, W, 3) uint8."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        Image, _ = pillow()
        image = np.asarray(image.convert("L") if image.mode in GREY_MODES else image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (1, 4):
        a = a[..., 0] if a.shape[-1] == 1 else a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3) or min(a.shape[:2]) < 1:
        raise DataError(f"an image array of shape {a.shape} is neither grey (H, W) nor colour (H, W, 3); give "
                        "uint8 pixels in one of those shapes")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    return to_uint8(a)


def fit(a: np.ndarray, size: int) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (size, size, 1 or 3): resized whole (bicubic; no crop, so nothing at the
    edges is lost; a non-square image is stretched)."""
    if a.shape[:2] != (size, size):
        Image, _ = pillow()
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))
    return a[..., None] if a.ndim == 2 else a


def stack_images(images: list[np.ndarray], channels: int | None = None) -> np.ndarray:
    """Images from `fit` -> (n, size, size, channels) uint8; channels None: 3 if any image is colour, else 1.
    Grey images become colour by repetition, colour images grey by luminance (ITU-R 601, as Pillow's 'L')."""
    if channels is None:
        channels = 3 if any(a.shape[-1] == 3 for a in images) else 1
    out = []
    for a in images:
        if a.shape[-1] != channels:
            a = np.repeat(a, 3, axis=-1) if channels == 3 else grey(a)
        out.append(a)
    if not out:
        return np.zeros((0, 1, 1, channels), dtype=np.uint8)
    return np.stack(out)


def grey(a: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 1) by Pillow's luminance weights."""
    y = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    return np.clip(np.round(y), 0, 255).astype(np.uint8)[..., None]


class ImageReader:
    """Decodes and fits image files, one bad-file policy for a whole read (data.on_bad_image): `error` stops at
    the first file Pillow cannot decode completely, naming it; `skip` leaves such files out and counts them."""

    def __init__(self, size: int, on_bad: str = "error"):
        self.size, self.on_bad = size, on_bad
        self.skipped: list[str] = []

    def read(self, path: Path, where: str = "") -> np.ndarray | None:
        """(size, size, 1 or 3) uint8, or None for a bad file under on_bad=skip."""
        if not path.is_file():
            raise DataError(f"{where or path}: image file {path} not found; fix the path or remove the entry")
        try:
            return fit(decode_image(path), self.size)
        except Exception as e:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, DecompressionBomb...
            if self.on_bad != "skip":
                raise DataError(f"{path}: cannot read this image ({type(e).__name__}: {str(e)[:200]}); replace or "
                                "remove the file, or set data.on_bad_image=skip to leave unreadable images out "
                                "(they are counted)") from None
            self.skipped.append(str(path))
            return None

    def note(self) -> str | None:
        """What the log says about skipped files (None when none were)."""
        if not self.skipped:
            return None
        return (f"data.on_bad_image=skip: left out {len(self.skipped)} unreadable image(s), first "
                f"{self.skipped[0]}")
