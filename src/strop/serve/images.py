"""POST /v1/predict for image models: image files as multipart uploads or base64 in JSON -> labels, scores.

Same guard (API key, admission, body limit, content type), batcher and metrics as for texts (classify.py);
what is particular here:
- two bodies: multipart/form-data with one file part named `image` per image (the guard checked its type
  and size; the route parses the parts), or JSON {"inputs": [{"image": "<base64 of the file>"}]};
- the size an image's header declares is checked before any pixel is decoded: above
  serve.max_image_pixels is a 413, so a small file that declares a huge image (a decompression bomb) costs
  no memory. Pillow's own limit (Image.MAX_IMAGE_PIXELS) is set to the same number, a second line of
  defence for any decode in the process;
- decoding runs on one thread of its own: the event loop keeps answering, and a worker holds at most one
  full-size image at a time. Each image is resized to the model's input size at once, as `strop predict`
  reads a file (data/image_files.py), so the queue, the batcher and the model only see small arrays;
- an image that cannot be decoded (truncated, not an image at all) is a 400 naming the upload;
- images never reach the log: not their bytes, base64 or pixels (serve.log_inputs logs byte counts).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from strop.data.image_files import TooManyPixels, decode_image_bytes, fit, pillow
from strop.serve.guard import MULTIPART, media_type
from strop.serve.inputs import ApiError, check_input_count
from strop.serve.openapi import PREDICT_ERRORS, error_responses, publish_schemas, request_body
from strop.serve.schema import ImagePredictRequest, PredictResponse, published_image_schemas

log = logging.getLogger("strop.serve")
EXAMPLE = '{"inputs": [{"image": "<base64 of a PNG or JPEG file>"}]}'
FIELD = "image"  # the name of each file part of a multipart body
MAX_PARTS = 1000  # parts a multipart body may hold (the parser's bound; serve.max_inputs counts images)


@dataclass
class Upload:
    where: str  # how messages name it: "inputs[0].image" or "upload 1 ('scan.png')"
    data: bytes  # the image file as sent


class InMemoryMultipart(MultiPartParser):
    """Starlette's multipart parser with every file part kept in memory: the guard has bounded the whole body
    already, so spilling parts over 1 MB to temporary files (Starlette's default) would only write patients'
    images to disk."""

    spool_max_size = 1 << 40


class ImageDecoder:
    """Uploaded image files -> (size, size, channels) uint8 arrays, on one thread of its own (one full-size
    image in memory at a time per server process)."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="strop-decode")
        self._pillow_limited = False

    async def decode(self, uploads: list[Upload], size: int) -> list[np.ndarray]:
        """One array per upload; 413 for an image over max_pixels, 400 for one that does not decode."""
        if not self._pillow_limited:
            limit_pillow(self.max_pixels)
            self._pillow_limited = True
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._decode_all, uploads, size)

    def _decode_all(self, uploads: list[Upload], size: int) -> list[np.ndarray]:
        return [self._decode(upload, size) for upload in uploads]

    def _decode(self, upload: Upload, size: int) -> np.ndarray:
        try:
            return fit(decode_image_bytes(upload.data, self.max_pixels), size)
        except TooManyPixels as e:
            raise ApiError(413, "image_too_large", f"{upload.where}: {e} (serve.max_image_pixels); send a "
                           "smaller image") from None
        except Exception as e:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, ...
            raise ApiError(400, "undecodable_image", f"{upload.where} cannot be decoded as an image "
                           f"({type(e).__name__}: {str(e)[:160]}); send a complete PNG, JPEG, TIFF or BMP "
                           "file") from None


def limit_pillow(max_pixels: int) -> None:
    """Pillow refuses in Image.open what the server refuses. Above twice the limit it raises itself; between
    once and twice it only warns, and the server's own check answers 413, so the warning adds nothing."""
    Image, _ = pillow()
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def warmup_images(meta: dict) -> list[np.ndarray]:
    """Two black images of the model's input size: the warm-up batch."""
    size, channels = meta["image"]["size"], meta["image"]["channels"]
    return [np.zeros((size, size, channels), dtype=np.uint8)] * 2


def add_image_route(app: FastAPI, state, auth: list, keyed: bool, require_ready) -> None:
    """POST /v1/predict for an image model, its two bodies published; `state` is app.ServerState."""
    publish_schemas(app, published_image_schemas(state.cfg.max_inputs))
    decoder = ImageDecoder(state.cfg.max_image_pixels)
    body = request_body({"application/json": "ImagePredictRequest", MULTIPART: "ImageUpload"})

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              dependencies=auth, responses=error_responses(PREDICT_ERRORS, keyed, retry_on_503=True),
              openapi_extra=body)
    async def predict(request: Request) -> PredictResponse:
        """Predict the class of one or several images, sent as files (multipart/form-data, one part named
        `image` per image) or base64 in JSON; images of concurrent requests are batched."""
        return await predict_images(state, require_ready(), decoder, request)


async def predict_images(state, model, decoder: ImageDecoder, request: Request) -> PredictResponse:
    """Label, score and probabilities per image, in the order sent."""
    cfg, meta = state.cfg, model.predictor.meta
    if media_type(request.headers.get("content-type", "")) == MULTIPART:
        uploads = await form_uploads(request)
    else:
        uploads = json_uploads(await request.body())
    check_input_count(len(uploads), cfg.max_inputs)
    for upload in uploads:
        if not upload.data:
            raise ApiError(400, "empty_input", f"{upload.where} is empty; send the image file's bytes")
    pixels = await decoder.decode(uploads, meta["image"]["size"])
    if cfg.log_inputs:  # sizes only: an image (or its base64) never reaches the log
        for i, upload in enumerate(uploads):
            log.info("input %d: an image file of %d bytes", i, len(upload.data))
    # every image costs the batch the same: one unit of serve.max_batch_tokens each
    outputs = await state.batcher.submit(pixels, None, [1] * len(pixels))
    return PredictResponse(model=model.version, task=meta["task"], predictions=outputs)


async def form_uploads(request: Request) -> list[Upload]:
    """The `image` file parts of a multipart body, in order; 400 when it does not parse, 422 for another
    field or a part without a filename (a plain form field, which the parser reads as text)."""
    parser = InMemoryMultipart(request.headers, request.stream(), max_files=MAX_PARTS,
                               max_fields=MAX_PARTS)
    try:
        form = await parser.parse()
    except (StarletteHTTPException, MultiPartException) as e:  # what Starlette's parser refuses
        detail = getattr(e, "detail", None) or getattr(e, "message", "")
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed ({detail}); "
                       f"send each image as a file part named '{FIELD}' (curl -F {FIELD}=@scan.png)") from None
    try:
        uploads = []
        for i, (name, value) in enumerate(form.multi_items()):
            if name != FIELD:
                raise ApiError(422, "schema_violation", f"part {i} is a field named {name[:40]!r}; this "
                               f"route takes only file parts named '{FIELD}' (see /openapi.json)")
            if isinstance(value, str):
                raise ApiError(422, "schema_violation", f"part {i} ('{FIELD}') is not a file: it has no "
                               f"filename; send it as a file, e.g. curl -F {FIELD}=@scan.png")
            uploads.append(Upload(f"upload {i} ({(value.filename or '')[:80]!r})", await value.read()))
        return uploads
    finally:
        await form.close()


def json_uploads(body: bytes) -> list[Upload]:
    """The base64 images of a JSON body; 400 for JSON or base64 that does not parse, 422 for another
    shape."""
    try:
        request = ImagePredictRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors(include_input=False, include_url=False)[0]
        if first["type"] == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            raise ApiError(400, "malformed_json", f"the body is not valid JSON ({reason}); send "
                           f"{EXAMPLE}") from None
        where = ".".join(str(p) for p in ("body", *first["loc"]))
        raise ApiError(422, "schema_violation", f"the body does not match the API schema: {where}: "
                       f"{first['msg']} (see /openapi.json; expected {EXAMPLE})") from None
    return [Upload(f"inputs[{i}].image", from_base64(item.image, f"inputs[{i}].image"))
            for i, item in enumerate(request.inputs)]


def from_base64(text: str, where: str) -> bytes:
    """The bytes a base64 text encodes; line breaks are allowed (GNU base64 wraps at 76 columns), other
    characters outside the alphabet are a 400."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"{where} is not valid base64; send the image file's bytes "
                       "base64-encoded (standard alphabet, = padding), e.g. base64 -w0 scan.png") from None
