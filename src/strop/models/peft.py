"""Parameter-efficient fine-tuning, composed onto a built model: `model, hook = apply_peft(model, cfg.peft, steps)`.

- lora / adalora: Hugging Face PEFT. We resolve the target modules ourselves (so `all-linear` can never reach the task
  head), put the head in `modules_to_save` (trained in full and saved with the adapter), add AdaLoRA's orthogonality
  regulariser to our loss (PEFT only adds it when the model computes the loss itself) and call its rank update in the
  loop (`hook(step)` after optimizer.step, before zero_grad).
- adapter: Houlsby bottleneck adapters (PEFT has none), written here: after the attention-output and FFN-output
  projections, `h + up(gelu(down(h)))` with `up` zero-initialised so training starts from the pretrained function.
- freeze: only the head, the pooler and the top `unfrozen_layers` transformer layers train.

Saving (`save_trained`): LoRA/AdaLoRA are merged into the base so `model/` loads with plain transformers, after a
parity check of merged vs unmerged logits; the unmerged adapter goes to `adapter/` (small, loads with PEFT onto the
base). Bottleneck adapters cannot be merged (they are non-linear): `model/` holds the base plus adapters.safetensors,
which `strop.load` re-applies.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from strop.errors import ConfigError, ModelError
from strop.models.layers import head_names, layer_list, under

ADAPTERS_FILE = "adapters.safetensors"
# Houlsby positions: the attention-output and FFN-output projections, by architecture family (name suffixes)
ADAPTER_TARGETS = (["output.dense"],  # BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa: attention.output.dense + output.dense
                   ["attention.out_lin", "ffn.lin2"],  # DistilBERT
                   ["attention.o", "output.dense"])  # MPNet


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------------------------
# target modules


def adaptable(m: nn.Module) -> bool:
    """Layers LoRA adapts: nn.Linear, and nn.Conv2d without groups (a convolution is linear in its input; PEFT
    cannot merge an adapter into a grouped, e.g. depthwise, one)."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def resolve_targets(model: nn.Module, targets: list, default: list[str] | None) -> list[str]:
    """Full names of the linear modules (`adaptable`) to adapt. targets: [] (= default), ['all-linear'],
    ['re:<regex>'] or name suffixes. The head is never a target: naming it is an error, all-linear leaves it out."""
    # the output embedding (a decoder's lm_head, often tied to the input embedding) is never adapted, as in PEFT's
    # own all-linear: it is as large as the vocabulary and already maps hidden states to tokens
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [n for n, m in model.named_modules() if adaptable(m) and m is not output]
    heads = head_names(model)
    body = [n for n in linears if not under(n, heads)]
    wanted = list(targets) or default or ["all-linear"]
    if wanted == ["all-linear"]:
        found = body
    elif str(wanted[0]).startswith("re:"):
        found = [n for n in linears if re.fullmatch(wanted[0][3:], n)]
    else:
        found = [n for n in linears if any(n == t or n.endswith("." + str(t)) for t in wanted)]
    in_head = [n for n in found if under(n, heads)]
    if in_head:
        raise ConfigError(f"peft.target_modules={wanted} matches the task head {in_head}; the head is always trained "
                          "in full and saved with the adapter, so leave it out of peft.target_modules")
    if not found:
        suffixes = sorted({".".join(n.split(".")[-2:]) for n in body})
        raise ConfigError(f"peft.target_modules={wanted} matches no linear layer of this model; its linear layers "
                          f"end in {suffixes} (or use all-linear)")
    return found


def _default_adapter_targets(model: nn.Module) -> list[str]:
    heads = head_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not under(n, heads)]
    for suffixes in ADAPTER_TARGETS:
        if all(any(n.endswith("." + s) for n in linears) for s in suffixes):
            return suffixes
    raise ConfigError("peft.method=adapter does not know where this architecture's attention-output and FFN-output "
                      "projections are; name them in peft.target_modules")


def head_modules(model: nn.Module) -> list[str]:
    """Names of what PEFT must train in full and save (modules_to_save): the task head, plus any module strop added
    that has no pretrained value (flagged `_strop_always_train`, e.g. NER's word-shape embedding)."""
    return head_names(model) + [n for n, m in model.named_modules() if getattr(m, "_strop_always_train", False)]


# ---------------------------------------------------------------------------------------------------------------
# bottleneck adapters (ours)


class BottleneckAdapter(nn.Module):
    """h -> h + up(gelu(down(dropout(h)))); up starts at zero, so a fresh adapter is the identity."""

    def __init__(self, hidden: int, size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (batch, seq_len, hidden) -> same shape."""
        return h + self.up(nn.functional.gelu(self.down(self.dropout(h))))


class AdaptedLinear(nn.Module):
    """A pretrained projection followed by its adapter."""

    def __init__(self, base: nn.Linear, adapter: BottleneckAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_adapters(model: nn.Module, targets: list[str], size: int, dropout: float) -> None:
    """Wrap each named nn.Linear with a bottleneck adapter (in place)."""
    for name in targets:
        linear = model.get_submodule(name)
        adapter = BottleneckAdapter(linear.out_features, size, dropout).to(linear.weight.device)
        _set_module(model, name, AdaptedLinear(linear, adapter))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the adapters only, keyed '<wrapped module>.<down|up>.<weight|bias>'."""
    return {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in model.named_modules()
            if isinstance(m, AdaptedLinear) for k, v in m.adapter.state_dict().items()}


def remove_adapters(model: nn.Module) -> None:
    """Put the plain projections back (in place), so the base saves in its own format."""
    for name, m in list(model.named_modules()):
        if isinstance(m, AdaptedLinear):
            _set_module(model, name, m.base)


# ---------------------------------------------------------------------------------------------------------------
# applying a method


class PeftHook:
    """What the loop calls for PEFT: `regularizer()` is added to each batch's loss, `hook(step)` runs after
    optimizer.step() and before zero_grad() (AdaLoRA's rank budget update needs the gradients). No-ops otherwise."""

    def __init__(self, model: nn.Module | None = None, orth_reg_weight: float = 0.0,
                 lr_scales: dict[str, float] | None = None):
        self.model, self.orth_reg_weight = model, orth_reg_weight  # model set only for AdaLoRA
        # learning-rate multipliers by parameter-name part, for the optimizer (LoRA+: {"lora_B": ratio})
        self.lr_scales = lr_scales or {}

    def __call__(self, step: int) -> None:
        if self.model is not None:
            self.model.base_model.update_and_allocate(step)

    def regularizer(self) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty: mean over A/B matrices of ||P P^T - I||_F (as in PEFT's AdaLoraModel)."""
        if self.model is None or self.orth_reg_weight == 0:
            return None
        total, n = 0.0, 0
        for name, p in self.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device), "fro")
                n += 1
        return self.orth_reg_weight * total / max(n, 1)


def _steps(value: float, total: int) -> int:
    return int(value * total) if value < 1 else int(value)


def apply_peft(model: nn.Module, p, total_steps: int) -> tuple[nn.Module, PeftHook]:
    """The model with the PEFT method of config section `p` applied (trainable flags set) and the loop's hook."""
    if p.method == "none":
        return model, PeftHook()
    if p.method == "freeze":
        freeze_layers(model, p.unfrozen_layers)
        return model, PeftHook()
    if p.method == "adapter":
        targets = resolve_targets(model, p.target_modules, _default_adapter_targets(model))
        for param in model.parameters():
            param.requires_grad_(False)
        add_adapters(model, targets, p.adapter_size, p.dropout)
        heads = head_names(model)
        for name, m in model.named_modules():  # Houlsby also trains the layer norms (a few thousand numbers)
            if is_norm(m) or under(name, heads):
                for param in m.parameters(recurse=False):
                    param.requires_grad_(True)
        for name in head_modules(model):
            model.get_submodule(name).requires_grad_(True)
        return model, PeftHook()
    return _apply_lora(model, p, total_steps)


def require_peft():
    """The `peft` package, or an error that says how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("peft.method=lora/adalora needs the PEFT library: pip install 'strop[peft]'") from None
    return peft


def _apply_lora(model: nn.Module, p, total_steps: int) -> tuple[nn.Module, PeftHook]:
    require_peft()
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    targets = resolve_targets(model, p.target_modules, None)
    to_save = head_modules(model)
    if p.train_norms:  # norms via modules_to_save and biases via bias="all", so adapter/ saves them too
        to_save += [n for n, m in model.named_modules() if is_norm(m) and not any(
            n == h or n.startswith(h + ".") for h in to_save)]
    common = dict(target_modules=targets, modules_to_save=to_save, lora_alpha=p.alpha, lora_dropout=p.dropout,
                  bias="all" if p.train_norms else "none")
    scales = {"lora_B": p.lr_ratio} if p.lr_ratio != 1 else {}
    if p.method == "lora":
        with quiet_peft():
            return get_peft_model(model, LoraConfig(r=p.r, **common)), PeftHook(lr_scales=scales)
    tinit, tfinal = _steps(p.tinit, total_steps), _steps(p.tfinal, total_steps)
    if tinit + tfinal >= total_steps:
        raise ConfigError(f"AdaLoRA needs steps to prune ranks in: peft.tinit ({tinit} steps) + peft.tfinal "
                          f"({tfinal} steps) >= the run's {total_steps} steps; lower peft.tinit / peft.tfinal or "
                          "train longer")
    config = AdaLoraConfig(init_r=p.init_r, target_r=p.r, tinit=tinit, tfinal=tfinal, deltaT=p.delta_t,
                           orth_reg_weight=p.orth_reg_weight, total_step=total_steps, **common)
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    return peft_model, PeftHook(peft_model, p.orth_reg_weight, scales)


@contextlib.contextmanager
def quiet_peft():
    """PEFT wraps a model after reading its deprecated `is_gradient_checkpointing`, which makes transformers print a
    FutureWarning on every LoRA run that the user can do nothing about; keep everything else PEFT says."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def is_norm(m: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the like (by class name: architectures define their own)."""
    return "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))


def freeze_layers(model: nn.Module, unfrozen: int) -> None:
    """Train only the head, the pooler and the top `unfrozen` layers."""
    layers = layer_list(model)
    if unfrozen > len(layers):
        raise ConfigError(f"peft.unfrozen_layers={unfrozen} but the model has {len(layers)} layers; set it to at "
                          f"most {len(layers)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in list(layers)[len(layers) - unfrozen:]:
        layer.requires_grad_(True)
    heads = head_names(model)
    for name, m in model.named_modules():
        if under(name, heads) or name.endswith("pooler") or getattr(m, "_strop_always_train", False):
            m.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------
# saving and loading


@torch.inference_mode()
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(**batch).logits.float()
    model.train(was)
    return out


def merge_lora(model: nn.Module, probe: dict | None, atol: float = 1e-4) -> tuple[nn.Module, float | None]:
    """(base model with the LoRA/AdaLoRA weights merged in, max |logit difference| on `probe`).

    probe: model inputs (a few real examples) compared before and after merging; a difference above
    `merge_tolerance` is a bug and raises rather than saving a model that predicts something else.
    """
    before = _logits(model, probe) if probe else None
    merged = model.merge_and_unload()
    if before is None:
        return merged, None
    diff = float((before - _logits(merged, probe)).abs().max())
    limit = merge_tolerance(before, atol)
    if diff > limit:
        raise ModelError(f"merging the adapter changed the logits by {diff:.2e} (> {limit:.2e}); the unmerged "
                         "adapter is saved in adapter/, report this")
    return merged, diff


def merge_tolerance(logits: torch.Tensor, atol: float = 1e-4) -> float:
    """The largest merge difference that is float32 rounding, not a bug: `atol` for logits up to 1, relative above.
    W + B A summed into one matrix rounds differently from W x + B (A x), and the error grows with the logits'
    size: a correct merge of a 6-class emotion model differed by 1.9e-4 (bench/heldout.py, seed 42)."""
    return atol * max(1.0, float(logits.abs().max()))


def save_adapter(model: nn.Module, tokenizer, folder: Path, base_path: str, meta: dict) -> None:
    """The unmerged adapter (+ head) in PEFT's format, loadable with PeftModel.from_pretrained(base, folder)."""
    model.peft_config["default"].base_model_name_or_path = base_path
    with warnings.catch_warnings():
        # AdaLoRA can prune a module to rank 0; PEFT then warns about unsharded DeepSpeed/FSDP tensors, wrongly
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / "strop.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_adapter(folder: Path, build_base, resolve=None) -> nn.Module:
    """A run's adapter/ folder applied to the base model it names (adapter_config.json), merged for inference.

    The base must be a local safetensors folder, checked by `resolve(folder)` (the task's; a Hugging Face folder
    by default); `build_base(folder)` puts the task's architecture on it (a fresh head: the adapter holds the
    trained head, modules_to_save)."""
    require_peft()
    from peft import PeftModel

    from strop.models.backbone import resolve_model_path

    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    base_path = config.get("base_model_name_or_path")
    if not base_path or not Path(base_path).is_dir():
        raise ModelError(f"{folder}: the base model this adapter was trained on ({base_path!r}) is not a local "
                         "folder here; load the run's model/ folder (adapter merged) instead")
    model = build_base((resolve or resolve_model_path)(base_path))
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


def load_bottleneck(model: nn.Module, folder: Path, peft_meta: dict) -> None:
    """Re-apply saved bottleneck adapters to a freshly loaded base (inference: no dropout)."""
    add_adapters(model, peft_meta["targets"], peft_meta["adapter_size"], 0.0)
    state = load_file(str(Path(folder) / ADAPTERS_FILE))
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLinear):
            m.adapter.load_state_dict({k: state[f"{name}.{k}"] for k in m.adapter.state_dict()})


def describe(model: nn.Module, p) -> dict:
    """What strop.json records about the method (targets as resolved, counts)."""
    trainable, total = count_parameters(model)
    out = {"method": p.method, "trainable_params": trainable, "total_params": total}
    if p.method in ("lora", "adalora"):
        cfg = model.peft_config["default"]
        out.update(r=p.r, alpha=p.alpha, targets=sorted(cfg.target_modules), merged=True, lr_ratio=p.lr_ratio,
                   train_norms=p.train_norms)
        if p.method == "adalora":
            out.update(init_r=p.init_r)
    elif p.method == "adapter":
        out.update(targets=[n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)],
                   adapter_size=p.adapter_size, merged=False)
    elif p.method == "freeze":
        out.update(unfrozen_layers=p.unfrozen_layers)
    return out


def save_trained(model: nn.Module, tokenizer, run_dir: Path, meta: dict, p, probe: dict | None,
                 base_path: str) -> dict:
    """Write run_dir/model (and run_dir/adapter for LoRA/AdaLoRA) for a trained model; returns the meta written.

    probe: a few examples' model inputs for the merge parity check."""
    from strop.models.classifier import save_model

    meta = {**meta, "peft": describe(model, p)}
    if p.method in ("lora", "adalora"):
        save_adapter(model, tokenizer, run_dir / "adapter", base_path, meta)
        merged, diff = merge_lora(model, probe)
        meta["peft"]["merge_max_abs_diff"] = diff
        save_model(merged, tokenizer, run_dir / "model", meta)
    elif p.method == "adapter":
        state = adapter_state(model)
        remove_adapters(model)
        save_model(model, tokenizer, run_dir / "model", meta)
        save_file(state, str(run_dir / "model" / ADAPTERS_FILE))
    else:
        save_model(model, tokenizer, run_dir / "model", meta)
    return meta
