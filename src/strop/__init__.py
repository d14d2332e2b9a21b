"""strop: fine-tune pretrained transformers for your task and carry the result to production.

    import strop
    run = strop.train("configs/quickstart.yaml", ["train.epochs=1"])
    model = strop.load(run.run_dir)
    model.predict(["where is my parcel?"])
    parity = strop.export(run.run_dir)   # RUN/export/: ONNX fp32 + int8, each checked against PyTorch
"""

import os as _os

__version__ = "0.1.0"

# torch's CPU matmuls run on oneDNN, which keeps up to 1,024 compiled primitives, one per operand shape, each holding
# ~0.3 MB. Batches of varying length make new shapes all run long, so RSS grew by 300-600 MB over an SST-2 training
# run. 64 entries still cover every shape of one step (measured: the same speed, 170-330 MB less at 400 steps;
# DECISIONS.md). oneDNN reads this when it first builds a primitive; a user's own setting wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


def train(config=None, overrides=None, overwrite: bool = False, resume=False):
    """Fine-tune as the config says (YAML path, Config, or None) with overrides; returns a RunResult.
    resume=True continues the named run from its newest complete checkpoint; resume='runs/x' continues that folder."""
    from strop.run import train as _train

    return _train(config, overrides, overwrite=overwrite, resume=resume)


def load(path, device: str = "cpu", precision: str = "fp32"):
    """The predictor of a finished run folder (runs/<name>), its model/ folder or an export folder."""
    from strop.tasks import load_predictor

    return load_predictor(path, device=device, precision=precision)


def export(run, log=print, **options) -> dict:
    """Export a finished run folder to RUN/export/ as `strop export` does: ONNX fp32 (refused when any
    logit differs from PyTorch's by more than `tolerance` on held data), int8 variants and, on request,
    pruned / distilled ones. options are strop.compress.options.ExportOptions fields (int8, tolerance,
    timing, prune={'heads': 0.25}, ...); returns what RUN/export/parity.json holds.
    `strop.load(run / "export")` then predicts with ONNX Runtime."""
    import dataclasses

    from strop.compress.export import ExportOptions, export_run
    from strop.errors import StropError

    valid = [f.name for f in dataclasses.fields(ExportOptions)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise StropError(f"strop.export: unknown option {unknown[0]!r}; the options are {valid}")
    return export_run(run, ExportOptions(**options), log=log)
