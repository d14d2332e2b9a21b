"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_images) for the API of an image model: its binary
strings (multipart `image` parts, format binary) and base64 strings (JSON `image`, format byte) are images.

JSON Schema cannot say "the bytes of a decodable image", so without these hooks schemathesis sends random
bytes as valid data and takes the server's 400 (undecodable image) for a rejected valid request (ST202).
With them, what it calls valid is a real PNG, JPEG, BMP or TIFF of 1 to 64 pixels a side, grey or colour;
its negative cases (wrong types, missing or unknown fields, too many images) are generated as before.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


def image_file(args: tuple) -> bytes:
    width, height, grey, fmt, seed = args
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width) if grey else (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


FORMATS = ["PNG", "JPEG", "BMP", "TIFF"]
IMAGE_FILES = st.tuples(st.integers(1, 64), st.integers(1, 64), st.booleans(), st.sampled_from(FORMATS),
                        st.integers(0, 2**32 - 1)).map(image_file)
schemathesis.openapi.format("binary", IMAGE_FILES)
schemathesis.openapi.format("byte", IMAGE_FILES.map(lambda data: base64.b64encode(data).decode()))
