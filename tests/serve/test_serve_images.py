"""`strop serve` of an image-classification run against a real server on loopback: multipart uploads and
base64 JSON give the Python API's probabilities; content types, byte and pixel limits (a decompression bomb),
undecodable images, the API key, batching, metrics and drain; no image reaches the log."""

from __future__ import annotations

import base64
import io
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import IMAGE_CLASSES, toy_images, write_dicom
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import strop

from .serve_helpers import ServerProcess

KEY = "image-serving-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_PIXELS = 1_000_000  # serve.max_image_pixels of the test server
MAX_BODY = 200_000  # serve.max_body_bytes of the test server


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares width x height RGB pixels (its data is a few zero rows):
    decoding it would allocate width * height * 3 bytes before finding the data short."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Toy images as files: a colour PNG per class, a grey PNG, a larger JPEG (the server resizes it)."""
    colour, _ = toy_images(3, 11)
    grey, _ = toy_images(1, 12, colour=False)
    big, _ = toy_images(1, 13, side=90)
    files = {f"{name}.png": png(a) for name, a in zip(IMAGE_CLASSES, colour)}
    files["grey.png"], files["big.jpg"] = png(grey[0]), jpeg(big[0])
    folder = tmp_path_factory.mktemp("upload")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: (folder / name) for name in files}


@pytest.fixture(scope="module")
def server(image_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image-server")
    (tmp / "key").write_text(KEY + "\n", encoding="utf-8")
    # log_inputs on: even then only byte counts may reach the log
    srv = ServerProcess(image_run, "--api-key-file", str(tmp / "key"), "serve.max_inputs=4",
                        f"serve.max_body_bytes={MAX_BODY}", f"serve.max_image_pixels={MAX_PIXELS}",
                        "serve.log_inputs=true", log_path=tmp / "server.log")
    srv.wait_ready(headers=AUTH)
    yield srv
    srv.stop()


def post(server, **kwargs) -> httpx.Response:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}/v1/predict", headers=headers, timeout=60, **kwargs)


def files(*pairs) -> list:
    """httpx multipart files: one part named `image` per (filename, bytes)."""
    return [("image", (name, data)) for name, data in pairs]


def probs(predictions: list[dict]) -> torch.Tensor:
    return torch.tensor([[p["probs"][label] for label in IMAGE_CLASSES] for p in predictions])


def error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == r.status_code, r.text
    return body["error"]


def test_multipart_and_base64_give_the_python_apis_probabilities(server, image_run, images):
    names = ["horizontal.png", "spot.png", "vertical.png", "big.jpg"]
    want = strop.load(image_run).predict([str(images[n]) for n in names])
    one = post(server, files=files((names[0], images[names[0]].read_bytes())))
    several = post(server, files=files(*[(n, images[n].read_bytes()) for n in names]))
    as_json = post(server, json={"inputs": [{"image": base64.b64encode(images[n].read_bytes()).decode()}
                                            for n in names]})
    for r in (one, several, as_json):
        assert r.status_code == 200, r.text
        assert r.json()["task"] == "image_classification" and r.json()["model"].startswith("images@")
    # the server decodes and resizes as strop.load(...).predict reads a file; only the batch differs (a batch
    # of one rounds a little differently on the CPU), hence 1e-5 rather than equality
    torch.testing.assert_close(probs(several.json()["predictions"]), probs(want), rtol=0, atol=1e-5)
    torch.testing.assert_close(probs(as_json.json()["predictions"]), probs(want), rtol=0, atol=1e-5)
    torch.testing.assert_close(probs(one.json()["predictions"]), probs(want[:1]), rtol=0, atol=1e-5)
    got = several.json()["predictions"]
    assert [p["label"] for p in got] == [w["label"] for w in want]
    assert [p["score"] for p in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
    assert set(got[0]) == {"label", "score", "probs"}  # the single-label answer of a text classifier


def test_a_grey_image_and_wrapped_base64_are_served(server, image_run, images):
    grey = images["grey.png"].read_bytes()
    wrapped = base64.encodebytes(grey).decode()  # line breaks every 76 characters, as GNU base64 writes
    r = post(server, json={"inputs": [{"image": wrapped}]})
    assert r.status_code == 200, r.text
    # the colour model reads a grey image as three equal channels
    want = strop.load(image_run).predict(str(images["grey.png"]))
    torch.testing.assert_close(probs(r.json()["predictions"]), probs(want), rtol=0, atol=1e-5)


def test_a_dicom_upload_is_read_as_the_file_is(server, image_run, tmp_path):
    # a grey scan stored as 16-bit values with a window: served as `strop predict` reads the same .dcm file
    pixels = (toy_images(1, 14, colour=False)[0][0].astype(np.uint16) * 16)
    scan = write_dicom(tmp_path / "scan.dcm", pixels, WindowCenter=2000, WindowWidth=4000)
    r = post(server, files=files(("scan.dcm", scan.read_bytes())))
    assert r.status_code == 200, r.text
    want = strop.load(image_run).predict(str(scan))
    torch.testing.assert_close(probs(r.json()["predictions"]), probs(want), rtol=0, atol=1e-5)
    # a DICOM bomb: 16 stored pixels, a header declaring 1000 x 1100 (over MAX_PIXELS), refused from the header
    big = write_dicom(tmp_path / "big.dcm", np.zeros((4, 4), dtype=np.uint8), Rows=1100, Columns=1000)
    r = post(server, files=files(("big.dcm", big.read_bytes())))
    assert r.status_code == 413 and "1000x1100" in error(r)["message"], r.text


def test_refusals_name_the_reason_and_the_upload(server, images):
    good = images["spot.png"].read_bytes()
    truncated = good[: len(good) // 2]
    b64 = base64.b64encode(good).decode()
    cases = [  # request, status, code, text the message must hold
        (dict(content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type",
         "'Content-Type: multipart/form-data'"),
        (dict(content=good, headers={"content-type": "image/png"}), 415, "unsupported_media_type",
         "'Content-Type: application/json'"),
        (dict(files=files(("a.png", good), ("b.png", truncated))), 400, "undecodable_image",
         "upload 1 ('b.png') cannot be decoded"),
        (dict(json={"inputs": [{"image": base64.b64encode(truncated).decode()}]}), 400, "undecodable_image",
         "inputs[0].image cannot be decoded"),
        (dict(files=files(("notes.txt", b"not an image"))), 400, "undecodable_image",
         "upload 0 ('notes.txt')"),
        (dict(json={"inputs": [{"image": "not base64!"}]}), 400, "invalid_base64", "inputs[0].image"),
        (dict(json={"inputs": [{"image": ""}]}), 400, "empty_input", "inputs[0].image is empty"),
        (dict(json={"inputs": []}), 400, "empty_input", "inputs is empty"),
        (dict(json={"inputs": [{"image": b64}] * 5}), 413, "too_many_inputs", "the limit is 4"),
        (dict(files=files(*[("a.png", good)] * 5)), 413, "too_many_inputs", "the limit is 4"),
        (dict(json={"inputs": [b64]}), 422, "schema_violation", "body.inputs.0"),
        (dict(json={"inputs": [{"image": b64, "text": "x"}]}), 422, "schema_violation",
         "body.inputs.0.text"),
        (dict(files=[("photo", ("a.png", good))]), 422, "schema_violation", "a field named 'photo'"),
        (dict(files=[("image", (None, b"abc"))]), 422, "schema_violation", "it has no filename"),
        (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400,
         "malformed_multipart", "cannot be parsed"),
        (dict(content=b'{"inputs": [', headers={"content-type": "application/json"}), 400, "malformed_json",
         "not valid JSON"),
    ]
    for kwargs, status, code, text in cases:
        r = post(server, **kwargs)
        assert r.status_code == status, (kwargs.get("headers"), r.status_code, r.text)
        assert error(r)["code"] == code and text in error(r)["message"], r.text


def test_byte_limit_refuses_before_reading_the_body(server, images):
    # noise does not compress: a PNG of ~270 kB
    big = np.random.default_rng(0).integers(0, 256, (300, 300, 3)).astype(np.uint8)
    body = png(big)
    assert len(body) > MAX_BODY
    r = post(server, files=files(("noise.png", body)))
    assert r.status_code == 413 and error(r)["code"] == "body_too_large"
    assert f"limit of {MAX_BODY} bytes" in error(r)["message"]


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the most memory the process ever held resident (Linux), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_decompression_bomb_gets_413_without_being_decoded(server, images):
    peak = _peak_rss_mb(server.pid)
    # 30000 x 30000 RGB would be 2.7 GB decoded: above Pillow's own limit (set to serve.max_image_pixels)
    huge = post(server, files=files(("bomb.png", bomb_png(30000, 30000))))
    # 1200 x 1200 = 1.44 M pixels is over the limit but under twice it, where Pillow only warns: the
    # server's own header check refuses it
    over = post(server, json={"inputs": [{"image": base64.b64encode(bomb_png(1200, 1200)).decode()}]})
    for r in (huge, over):
        assert r.status_code == 413 and error(r)["code"] == "image_too_large", r.text
        assert f"the limit is {MAX_PIXELS} pixels" in error(r)["message"]
    assert "upload 0 ('bomb.png')" in error(huge)["message"]
    assert "inputs[0].image: the image is 1200x1200 = 1440000 pixels" in error(over)["message"]
    # the server lives on, and its peak memory moved by far less than the bomb's 2.7 GB
    assert _peak_rss_mb(server.pid) - peak < 10
    assert httpx.get(f"{server.url}/health/live").status_code == 200
    assert post(server, files=files(("spot.png", images["spot.png"].read_bytes()))).status_code == 200


def test_the_api_key_is_required(server, images):
    data = images["spot.png"].read_bytes()
    for kwargs in (dict(files=files(("spot.png", data))), dict(json={"inputs": [{"image": "AAAA"}]})):
        r = httpx.post(f"{server.url}/v1/predict", **kwargs)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert error(r)["code"] == "unauthorized"


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name)


def test_concurrent_requests_share_batches_and_are_counted(server, images):
    data = images["vertical.png"].read_bytes()
    inputs = _metric(server.url, "strop_inputs_total")
    batches = _metric(server.url, "strop_batch_size_inputs_count")
    with ThreadPoolExecutor(8) as pool:
        two = files(("v.png", data), ("v.png", data))
        codes = list(pool.map(lambda _: post(server, files=two).status_code, range(8)))
    assert codes == [200] * 8
    assert _metric(server.url, "strop_inputs_total") - inputs == 16  # 8 requests x 2 images
    # a batch is one forward pass; 8 requests in flight together need fewer (the batcher merges them)
    assert _metric(server.url, "strop_batch_size_inputs_count") - batches < 8


def test_model_info_describes_the_image_model(server, image_run):
    info = httpx.get(f"{server.url}/v1/model", headers=AUTH).json()
    assert info["task"] == "image_classification" and info["labels"] == IMAGE_CLASSES
    assert info["image_size"] == 32 and info["max_length"] is None  # image.size of the conftest image_run
    assert info["limits"]["max_image_pixels"] == MAX_PIXELS and info["limits"]["max_body_bytes"] == MAX_BODY


def test_no_image_reaches_the_log(server, images):
    data = images["horizontal.png"].read_bytes()
    b64 = base64.b64encode(data).decode()
    assert post(server, json={"inputs": [{"image": b64}]}).status_code == 200
    half = b64[: len(b64) // 8 * 4]  # the first half of the file: a truncated PNG
    assert post(server, json={"inputs": [{"image": half}]}).status_code == 400
    time.sleep(0.2)  # the log line of the last request
    log = server.log()
    assert f"an image file of {len(data)} bytes" in log  # serve.log_inputs logged the request, by size only
    for needle in (b64[40:80], base64.b64encode(data[:30]).decode()[:32], "IHDR", "\\x89PNG", "PNG\r\n"):
        assert needle not in log


def test_sigterm_drains_an_image_server(image_run, images, tmp_path):
    srv = ServerProcess(image_run, "serve.drain_s=2", log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{srv.url}/health/ready", timeout=5)
        spot = files(("s.png", images["spot.png"].read_bytes()))
        r = httpx.post(f"{srv.url}/v1/predict", files=spot, timeout=30)
        assert ready.status_code == 503 and "draining" in error(ready)["message"]
        assert r.status_code == 200  # requests still run until the listener closes (serve.drain_s)
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        srv.stop()


def test_large_uploads_are_parsed_in_memory(monkeypatch):
    """Starlette spills file parts over 1 MB to temporary files; the image route keeps them in memory (the
    guard bounded the body), so no upload is written to disk."""
    import asyncio
    import tempfile

    from starlette.requests import Request

    from strop.serve.images import form_uploads

    def no_disk(self):
        raise AssertionError("an upload was spilled to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", no_disk)
    data = bytes(3_000_000)  # 3 MB: three times Starlette's spool limit
    request = httpx.Request("POST", "http://x", files=files(("big.png", data)))
    content, content_type = request.read(), request.headers["content-type"]

    async def receive():
        return {"type": "http.request", "body": content, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": [
        (b"content-type", content_type.encode()), (b"content-length", str(len(content)).encode())]}
    uploads = asyncio.run(form_uploads(Request(scope, receive)))
    assert [(u.where, len(u.data)) for u in uploads] == [("upload 0 ('big.png')", 3_000_000)]
