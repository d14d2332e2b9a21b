"""`strop export` options, and their checks: every option is checked before anything is exported or written, so a
bad value costs seconds and leaves nothing behind (not an ONNX export, then an error at the distillation step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from strop.errors import ExportError

PRUNE_KINDS = ("magnitude", "heads", "ffn")


@dataclass
class ExportOptions:
    """What `strop export` writes and checks (CLI options of the same names)."""

    int8: bool = True  # ONNX Runtime dynamic int8 (model.int8.onnx) and PyTorch dynamic int8
    static_int8: bool = False  # also ONNX static int8 calibrated on training data (model.static-int8.onnx)
    calibration_size: int = 256  # training examples for static int8 calibration
    prune: dict | None = None  # {'magnitude': s} and/or {'heads': f, 'ffn': f}
    recover_epochs: float = 0.0  # fine-tune the pruned model this many epochs on the training data
    distill: int = 0  # student layers (0 = no distillation)
    distill_epochs: float = 3.0  # student training epochs
    temperature: float = 2.0  # distillation temperature
    alpha: float = 0.5  # weight of the soft (teacher) loss; 1 - alpha goes to the gold labels
    distill_augment: int = 0  # perturbed copies of each training example, labelled by the teacher alone
    lr: float | None = None  # learning rate of recovery / distillation; empty = the run's train.lr
    tolerance: float = 1e-3  # max |logit difference| allowed between ONNX fp32 and PyTorch on held data
    data: str | None = None  # labelled file for parity and quality; empty = the run's validation (or test) split
    timing: bool = True  # measure p50/p95 latency at batch 1 and throughput at batch 32 for every variant
    timing_examples: int = 100  # examples timed at batch 1 (and x4 for throughput)
    threads: int = 0  # threads for torch and onnxruntime; 0 = torch's current setting
    gguf: str = "f16"  # generation runs: the GGUF file's weights, f16 or q8_0


def check_options(opts: ExportOptions) -> None:
    """The checks that need no model: ranges of each value and options that only make sense with another."""
    if not 0 <= opts.tolerance < math.inf:
        raise ExportError(f"--tolerance {opts.tolerance}: must be a number >= 0 (max |logit difference|), e.g. 1e-3")
    if opts.threads < 0:
        raise ExportError(f"--threads {opts.threads}: must be >= 0 (0 = all cores)")
    if opts.static_int8 and not opts.int8:
        raise ExportError("--static-int8 is one of the int8 variants, which --no-int8 turns off; drop one of them")
    if opts.static_int8 and opts.calibration_size < 1:
        raise ExportError(f"calibration_size={opts.calibration_size}: static int8 needs at least 1 calibration "
                          "example, e.g. 256")
    if opts.timing and opts.timing_examples < 1:
        raise ExportError(f"timing_examples={opts.timing_examples}: must be >= 1, or turn timing off (--no-timing)")
    for name, value in (("--recover-epochs", opts.recover_epochs), ("--distill-epochs", opts.distill_epochs)):
        if not 0 <= value < math.inf:
            raise ExportError(f"{name} {value}: must be a number of epochs >= 0, e.g. 1")
    if opts.lr is not None and not 0 < opts.lr < math.inf:
        raise ExportError(f"--lr {opts.lr}: the learning rate of the recovery / distillation training must be a "
                          "number > 0, e.g. 1e-4; leave it out to use the run's train.lr")
    if opts.prune:
        for kind, value in opts.prune.items():
            if kind not in PRUNE_KINDS:
                raise ExportError(f"--prune {kind}={value}: unknown kind {kind!r}; use magnitude=S and/or "
                                  "heads=F,ffn=F, e.g. --prune heads=0.25,ffn=0.5")
            if not 0 <= value < 1:  # also rejects NaN
                raise ExportError(f"--prune {kind}={value}: must be a fraction in [0, 1), e.g. {kind}=0.5")
    if opts.recover_epochs > 0 and not opts.prune:
        raise ExportError(f"--recover-epochs {opts.recover_epochs} fine-tunes the pruned model: add --prune "
                          "(e.g. --prune heads=0.25,ffn=0.5), or drop --recover-epochs")
    if opts.distill < 0 or opts.distill_augment < 0:
        raise ExportError(f"--distill {opts.distill} / --distill-augment {opts.distill_augment}: must be >= 0")
    if opts.distill_augment and not opts.distill:
        raise ExportError(f"--distill-augment {opts.distill_augment} needs a student to train: add --distill N "
                          "(the student's number of layers), or drop --distill-augment")
    if opts.distill:
        from strop.compress.distill import check_distill_settings

        check_distill_settings(opts.temperature, opts.alpha)
    if opts.lr is not None and not (opts.distill or (opts.prune and opts.recover_epochs > 0)):
        raise ExportError(f"--lr {opts.lr} is the learning rate of --recover-epochs / --distill training, and neither "
                          "is asked for; drop --lr or add one of them")


def check_options_for_model(opts: ExportOptions, model: nn.Module, meta: dict, task, run_dir: Path) -> None:
    """The checks that need the run's model: pruning and distillation apply to it (task, adapters, layer layout),
    the student is shallower than the teacher, and each structured pruning fraction keeps a head / neuron."""
    if not (opts.prune or opts.distill):
        return
    from strop.compress.distill import kept_layers
    from strop.compress.prune import encoder_layers, ffn_size, keep_count, n_heads

    if not task.compressible:
        raise ExportError(f"{run_dir} is a {task.name} run: --prune and --distill support classification runs "
                          "only so far; export it without them (ONNX fp32 + int8)")
    if (meta.get("peft") or {}).get("method") == "adapter":
        # h + up(gelu(down(h))) is not linear, so unlike LoRA it cannot be merged into the base's Linear layers, and
        # a pruned or distilled model with adapters inside would be neither a plain model nor the run's adapter layout
        raise ExportError(f"{run_dir} was trained with bottleneck adapters (peft.method=adapter), which are "
                          "non-linear and cannot be merged into the base model, so --prune and --distill (which "
                          "work on and save plain models) do not apply to it. Export it without them (the ONNX fp32 "
                          "and int8 models include the adapters), or train with peft.method=lora (merged into the "
                          "base at the end) or none to prune or distill")
    layers = encoder_layers(model)  # a clear error for layouts other than BERT-style encoders
    if opts.distill:
        kept_layers(len(layers), opts.distill)
    prune = opts.prune or {}
    if "heads" in prune:
        keep_count("heads", prune["heads"], n_heads(layers[0]), "attention heads")
    if "ffn" in prune:
        keep_count("ffn", prune["ffn"], ffn_size(layers[0]), "FFN neurons")
