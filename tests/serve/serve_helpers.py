"""Test helpers for `strop serve`: a real server in a subprocess on a free loopback port, and an ONNX export folder
in the layout the exporter (`strop export`) writes, made here with torch.onnx.export (test/bench code only).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`strop serve TARGET ...` in a subprocess; stderr/stdout go to `log_path`."""

    def __init__(self, target: Path, *args: str, log_path: Path, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # fp32 on the CPU unless a test sets them: the tests compare served numbers with `strop predict`'s to 1e-5
        precision = [f"serve.{k}={v}" for k, v in (("precision", "fp32"), ("device", "cpu"))
                     if not any(str(a).startswith(f"serve.{k}") for a in args)]
        cmd = [sys.executable, "-c", "import sys; from strop.cli import main; sys.exit(main())", "serve",
               str(target), "--port", str(self.port), *args, *precision]
        full_env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 90.0, headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1.0, headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def export_onnx(run_dir: Path, out: Path | None = None) -> Path:
    """RUN/export/: model.onnx (fp32), model.int8.onnx (dynamic int8), tokenizer files and strop.json."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from strop.runs import open_run
    from strop.tasks import load_trained

    model_dir = open_run(run_dir)
    model, tokenizer, _, _ = load_trained(model_dir)
    out = out or Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in
                                               tokenizer.model_input_names else [])
    sample = tokenizer(["an example", "a second, longer example text"], padding=True, return_tensors="pt")
    inputs = tuple(sample[n] for n in names)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args))).logits

    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    torch.onnx.export(Logits(model.eval()), inputs, str(out / "model.onnx"), input_names=names,
                      output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    quantize_dynamic(str(out / "model.onnx"), str(out / "model.int8.onnx"), weight_type=QuantType.QInt8)
    tokenizer.save_pretrained(str(out))
    shutil.copy(model_dir / "strop.json", out / "strop.json")
    return out


class ThreadServer:
    """A real uvicorn server for `create_app(target, cfg)` in a thread of the test process (no subprocess start-up;
    no signal handling). Use as a context manager."""

    def __init__(self, target: Path, **settings):
        import uvicorn

        from strop.serve.app import create_app
        from strop.serve.settings import load_serve_config

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cfg = load_serve_config(None, {"port": self.port, "precision": "fp32", "device": "cpu", **settings})
        self.app = create_app(target, self.cfg)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="on"))
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = self.app.state.strop
            if state.load_error:
                raise RuntimeError(state.load_error)
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("thread server not ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
