"""MLflow tracking: params (the flattened resolved config), metrics per step, config.yaml, results.json and the final
model folder as artifacts (safetensors + config + tokenizer + strop.json; never a pickled pyfunc), optionally
registered in the model registry (`mlflow.register_as`).

The default store is a local SQLite file, sqlite:///<output_dir>/mlflow.db, with artifacts in <output_dir>/mlartifacts:
no server, no network. Browse it with `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.

Metric names carry label names (validation/per_class/<label>/f1), and MLflow accepts only some characters in a name:
each other character becomes '_' (`MetricNames`), so `C++` is logged as validation/per_class/C__/f1. metrics.jsonl and
results.json keep the labels as they are.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from strop.config import flat_dict
from strop.track import require, scalars

# MLflow 3 sends usage telemetry from a background thread unless told not to; strop never contacts the network
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_PARAM_CHARS = 6000
# mlflow.utils.validation.validate_param_and_metric_name: slashes, word characters, '.', '-' and ' ' (and ':' except on
# Windows, left out so the store reads the same everywhere); whole names are at most 250 characters
NOT_ALLOWED = re.compile(r"[^/\w.\- ]")
MAX_SEGMENT_CHARS = 120  # a label this long still leaves room for final_validation/per_class/.../precision


class MetricNames:
    """strop metric name -> a name MLflow accepts: the same one every time it is asked, no two names alike.

    Each '/'-separated part is cleaned on its own (`mlflow_segment`); a part that then collides with a different part
    under the same parent (labels `a?b` and `a&b` both give `a_b`) becomes `a_b_2`, so all the metrics of one label
    stay together: validation/per_class/a_b_2/precision, validation/per_class/a_b_2/recall..."""

    def __init__(self):
        self.parts: dict[tuple[str, str], str] = {}  # (parent as logged, part as given) -> part as logged
        self.taken: dict[str, set[str]] = {}  # parent as logged -> the parts logged under it

    def __call__(self, name: str) -> str:
        parent = ""
        for part in name.split("/"):
            if (parent, part) not in self.parts:
                taken = self.taken.setdefault(parent, set())
                logged, k = mlflow_segment(part), 1
                while logged in taken:
                    k += 1
                    logged = mlflow_segment(part, MAX_SEGMENT_CHARS - len(str(k)) - 1) + f"_{k}"
                taken.add(logged)
                self.parts[parent, part] = logged
            parent = f"{parent}/{self.parts[parent, part]}" if parent else self.parts[parent, part]
        return parent


def mlflow_segment(part: str, limit: int = MAX_SEGMENT_CHARS) -> str:
    """One part of a metric name, cut to `limit` characters, with each character MLflow rejects replaced by '_'. MLflow
    reads names as file paths, so a part it would resolve away ('', '.', '..', or starting with '..') is changed too."""
    part = NOT_ALLOWED.sub("_", part[:limit])
    if not part.strip("."):
        return "_" * max(len(part), 1)
    return "_" + part[1:] if part.startswith("..") else part


def tracking_uri(cfg) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


class MlflowTracker:
    def __init__(self, run_dir: Path, cfg, resumed_from: int = 0):
        require("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(cfg))
        self.metric_name = MetricNames()
        self.register_as = cfg.mlflow.register_as
        experiment = self.client.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # artifacts beside the runs, not in ./mlruns of whatever folder strop was started from
            location = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(cfg.mlflow.experiment, artifact_location=location)
        tags = {"strop.run_dir": str(run_dir.resolve())}
        if resumed_from:  # a resumed run is a new MLflow run: MLflow cannot retract the steps logged after the checkpoint
            tags["strop.resumed_from_step"] = str(resumed_from)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flat_dict(cfg).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAMS_PER_BATCH])
        self.client.log_artifact(self.run_id, str(run_dir / "config.yaml"))

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        split, step, now = record.get("split", "train"), int(record.get("step", 0)), int(time.time() * 1000)
        values = scalars({k: v for k, v in record.items() if k not in ("step", "split")})
        metrics = [Metric(self.metric_name(f"{split}/{k}"), v, now, step) for k, v in values.items()]
        if metrics:  # one write per record: a few per evaluation, not per scalar
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path) -> None:
        for name in ("results.json", "data.json", "report.html"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.log_artifacts(self.run_id, str(run_dir / "model"), artifact_path="model")
        if (run_dir / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "adapter"), artifact_path="adapter")
        if self.register_as:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(self.register_as)
            except MlflowException:  # already registered: add a new version
                pass
            run = self.client.get_run(self.run_id)
            version = self.client.create_model_version(self.register_as, f"{run.info.artifact_uri}/model",
                                                       run_id=self.run_id)
            self.client.set_tag(self.run_id, "strop.registered_model", f"{self.register_as}/{version.version}")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
