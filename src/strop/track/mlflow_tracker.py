"""MLflow tracking: params (the flattened resolved config), metrics per step, config.yaml, results.json and the final
model folder as artifacts (safetensors + config + tokenizer + strop.json; never a pickled pyfunc), optionally
registered in the model registry (`mlflow.register_as`).

The default store is a local SQLite file, sqlite:///<output_dir>/mlflow.db, with artifacts in <output_dir>/mlartifacts:
no server, no network. Browse it with `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from strop.config import flat_dict
from strop.track import require, scalars

# MLflow 3 sends usage telemetry from a background thread unless told not to; strop never contacts the network
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_PARAM_CHARS = 6000


def tracking_uri(cfg) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


class MlflowTracker:
    def __init__(self, run_dir: Path, cfg, resumed_from: int = 0):
        require("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(cfg))
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
        metrics = [Metric(f"{split}/{k}", v, now, step) for k, v in values.items()]
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
