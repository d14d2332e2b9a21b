"""Atomic, complete, safely loadable checkpoints.

A checkpoint is written into `checkpoints/.tmp-step-N-<pid>/`, every file flushed to disk (fsync), a `COMPLETE` marker
written last, and the folder renamed to `checkpoints/step-N/`. A crash at any moment leaves either the previous
checkpoints untouched or a `.tmp-*` / marker-less folder, which `latest_checkpoint` ignores and removes.

Files: model.safetensors (weights), optimizer.pt and rng.pt (tensors and plain values only: loaded with
`weights_only=True`, so a pickle that would run code is refused), state.json (counters, data position, early stopping),
and best.safetensors (the best evaluation's trainable weights) only when that step has no checkpoint of its own
(eval_every and save_every differ), so a resumed run restores the same best weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from strop.errors import RunError

COMPLETE = "COMPLETE"
PREFIX = "step-"
BEST = "best.safetensors"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue as if it had never stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    best_loss: float | None = None  # validation loss of the best step: breaks ties of best_metric (lower wins)
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    skipped_steps: int = 0  # steps skipped for a non-finite loss/gradient
    train_tokens: int = 0
    window: list = field(default_factory=lambda: [0.0, 0, 0])  # loss sum, steps, examples since the last log line
    stopped_early: bool = False


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _unalias(model.state_dict())


def _unalias(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone shared storage apart (safetensors refuses aliased tensors, e.g. tied embeddings)
    seen, out = set(), {}
    for name, tensor in weights.items():
        t = tensor.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[name] = t.clone() if key in seen else t.contiguous()
        seen.add(key)
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, weights: dict | None = None,
                    optimizer_state: dict | None = None, best_weights: dict | None = None) -> Path:
    """Write checkpoints/step-<state.step>/ atomically; returns its path.
    weights / optimizer_state: the state dicts to write instead of model's and optimizer's own (FSDP gathers them).
    best_weights: the weights of evaluation step state.best_step, written as best.safetensors when that step has no
    checkpoint of its own."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"{PREFIX}{state.step}"
    tmp = root / f".tmp-{PREFIX}{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_weights(model) if weights is None else _unalias(weights), str(tmp / "model.safetensors"))
    _fsync_file(tmp / "model.safetensors")
    if best_weights is not None:
        save_file(_unalias(best_weights), str(tmp / BEST))
        _fsync_file(tmp / BEST)
    _torch_save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    _torch_save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "rng.pt")
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump(asdict(state), f)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / COMPLETE, "w") as f:  # written last: its presence means every other file is whole
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (after a resume): move the old one aside first, rename is atomic
        old = root / f".old-{PREFIX}{state.step}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def clean_partial(run_dir: Path, log=print) -> list[str]:
    """Remove checkpoint folders a crash left half-written; returns their names."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith((".tmp-", ".old-")) or not (p / COMPLETE).is_file()):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if removed:
        log(f"removed {len(removed)} incomplete checkpoint folder(s) left by an interrupted save: {sorted(removed)}")
    return removed


def latest_checkpoint(run_dir: Path, log=print) -> Path | None:
    """The newest complete checkpoint (partial ones are cleaned up first), or None."""
    clean_partial(run_dir, log)
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete complete checkpoints except the newest `keep_last` and those at `keep_steps` (the best one)."""
    found = complete_checkpoints(run_dir)
    keep = set(found[-keep_last:]) if keep_last > 0 else set()
    for p in found:
        if p not in keep and int(p.name[len(PREFIX):]) not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"checkpoint file {path} is missing; the checkpoint is incomplete") from None
    except Exception as e:  # UnpicklingError for unsafe payloads, RuntimeError/EOFError for corrupt files
        raise RunError(f"refusing to load {path}: it is not a plain tensor file ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}). Checkpoints only hold tensors and numbers; a file that "
                       "needs pickle code was not written by strop. Delete this checkpoint folder") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RunError(f"{path} is corrupt or truncated ({e}); delete this checkpoint folder to use an older one"
                       ) from None


def load_best_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The best evaluation's weights stored in checkpoint `path` (see save_checkpoint's best_weights), or None."""
    return load_weights(path / BEST) if (path / BEST).is_file() else None


def load_checkpoint(path: Path, model, optimizer, scheduler, load_state=None) -> TrainState:
    """Restore model, optimizer, scheduler and RNG in place; returns the TrainState to continue from.
    load_state(model, optimizer, weights, optimizer_state): loads the two state dicts instead of their own
    load_state_dict (FSDP splits them over the ranks)."""
    weights, optimizer_state = load_weights(path / "model.safetensors"), _load(path / "optimizer.pt")
    if load_state is None:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
    else:
        load_state(model, optimizer, weights, optimizer_state)
    extra = _load(path / "rng.pt")
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    try:
        return TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise RunError(f"{path / 'state.json'} is unreadable ({e}); delete this checkpoint folder") from None
