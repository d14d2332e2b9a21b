"""Trackers: each store is read back with its own tool's reader and must hold the values of metrics.jsonl, and a run
with every tracker on attempts no outbound connection."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from strop.errors import ConfigError
from strop.run import train

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")


def _records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture()
def no_network(monkeypatch):
    """Fail (and record) every connection to a non-loopback address, from any thread of this process."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(real):
        def connect(self, address):
            if not _is_local(address):
                attempts.append(address)
                raise OSError(f"test forbids outbound connections (to {address})")
            return real(self, address)
        return connect

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline by itself
    return attempts


def read_wandb_records(path):
    """The records of a W&B offline run file (run-*.wandb), parsed with wandb's own protobuf schema.

    The file is W&B's datastore: a 7-byte header (':W&B', magic 0xBEE1, version 0), then LevelDB-log framing in
    32 KiB blocks: each chunk has crc32c (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    records, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero-filled rest of a block
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir) -> list[tuple[int, dict]]:
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    rows = []
    for r in read_wandb_records(files[0]):
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows.append((r.history.step.num, items))
    return rows


def test_all_trackers_hold_the_metrics_of_metrics_jsonl_with_no_network(tiny_model, toy_splits, tmp_path,
                                                                       no_network):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs"
    args = tiny_overrides(tiny_model, out, **{"data.train": toy_splits["train"], "train.epochs": 2,
                                              "data.validation": toy_splits["validation"], "data.test": toy_splits["test"],
                                              "track": "tensorboard,mlflow,wandb", "mlflow.register_as": "toy-topics"})
    run_dir = train(None, args).run_dir
    assert no_network == []

    train_loss = [(r["step"], r["loss"]) for r in _records(run_dir, "train")]
    val_acc = [(r["step"], r["accuracy"]) for r in _records(run_dir, "validation")]
    assert [s for s, _ in train_loss] == [4, 8, 12, 16, 20, 24] and [s for s, _ in val_acc] == [12, 24]

    # TensorBoard's own event reader
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("train/loss")] == train_loss
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("validation/accuracy")] == val_acc

    # MLflow's client on the default local SQLite store
    assert (out / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("strop").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert history == [(s, pytest.approx(v, rel=1e-12)) for s, v in train_loss]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "validation/accuracy"))
    assert history == val_acc
    results = json.loads((run_dir / "results.json").read_text())
    assert run.data.metrics["final_test/accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert run.data.params["train.lr"] == "0.01" and run.data.params["model.path"] == str(tiny_model)
    assert run.data.params["track"] == str(["tensorboard", "mlflow", "wandb"])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/strop.json", "model/tokenizer.json"} <= artifacts
    assert not any(p.endswith((".pkl", ".bin", "MLmodel")) for p in artifacts)  # no pickled pyfunc
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "results.json", "model"} <= top
    logged_cfg = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
                                .read_text())
    assert logged_cfg == yaml.safe_load((run_dir / "config.yaml").read_text())
    (version,) = client.search_model_versions("name='toy-topics'")
    assert version.run_id == run.info.run_id and version.source.endswith("/model")
    assert run.data.params["mlflow.register_as"] == "toy-topics"

    # W&B: the offline run file under the run folder, parsed with wandb's own protobuf records
    rows = wandb_history(run_dir)
    wb_loss = [(step, items["train/loss"]) for step, items in rows if "train/loss" in items]
    wb_acc = [(step, items["validation/accuracy"]) for step, items in rows if "validation/accuracy" in items]
    assert wb_loss == [(s, pytest.approx(v, rel=1e-12)) for s, v in train_loss]
    assert wb_acc == val_acc
    config_items = {}
    for r in read_wandb_records(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))):
        if r.WhichOneof("record_type") == "run":  # the run record carries the config given to wandb.init
            config_items.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    assert config_items["train"]["lr"] == 0.01 and config_items["name"] == "run"
    summary = {}
    for r in read_wandb_records(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))):
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
    assert summary["test/accuracy"] == pytest.approx(results["test"]["accuracy"])  # results.json, from finish()


@pytest.mark.slow  # two runs, each creating an MLflow store (~10 s of schema migrations on a loaded 2-core machine)
def test_mlflow_second_run_registers_a_new_version(tiny_model, toy_splits, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    for name in ("a", "b"):
        args = tiny_overrides(tiny_model, out, **{"data.train": toy_splits["train"], "train.epochs": 1,
                                                  "track": "mlflow", "mlflow.register_as": "m", "name": name,
                                                  "mlflow.experiment": "exp"})
        train(None, args)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    versions = sorted(int(v.version) for v in client.search_model_versions("name='m'"))
    assert versions == [1, 2]
    assert not (out / "a" / "tb").exists()  # only the trackers asked for


@pytest.mark.slow
def test_failed_run_is_marked_failed_in_mlflow(tiny_model, toy_splits, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    args = tiny_overrides(tiny_model, out, **{"data.train": toy_splits["train"], "track": "mlflow"})

    def explode(step, value):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        train(None, args, on_eval=explode)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("strop").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("overrides, words", [
    (["track=comet"], ["'comet'", "mlflow", "wandb"]),
    (["wandb.mode=cloud"], ["wandb.mode='cloud'", "offline"]),
])
def test_tracker_config_errors(overrides, words):
    from strop.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert all(w in str(e.value) for w in words)


def test_missing_tracker_library_names_the_extra(monkeypatch):
    import sys

    from strop.track import check_trackers

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'strop\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])
