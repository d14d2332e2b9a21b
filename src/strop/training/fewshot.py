"""Few-shot training (train.mode=fewshot): contrastive fine-tuning of the sentence encoder, then a linear head.

SetFit's recipe, re-shaped for speed: instead of sampling text pairs and encoding both texts of every pair, each
step encodes a batch of examples once and scores *every* pair inside it (a batch of 48 gives 1,128 pairs for 48
forward passes). The contrastive phase runs through the ordinary training loop (`fit` with a pair loss); the head is
then fitted in closed form on the normalised embeddings and written into `MeanPoolClassifier.classifier`, so the
run's model/ is a normal pooling=mean model that predict, eval, export and serve load unchanged.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from strop.data.batching import Encoded, collate_inputs, eval_batches
from strop.device import autocast
from strop.errors import ConfigError, DataError
from strop.models.classifier import MeanPoolClassifier, Output
from strop.training.loop import FitResult, fit
from strop.training.progress import console


def class_counts(labels: np.ndarray, num_labels: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)


def resolve_mode(cfg, task, train_labels, label_names: list[str]) -> str:
    """'standard' or 'fewshot' for this run; train.mode=auto picks fewshot for a tiny single-label training set."""
    mode = cfg.train.mode
    if mode == "auto":
        fits = "fewshot" in task.modes and train_labels is not None
        largest = int(class_counts(train_labels, len(label_names)).max()) if fits else None
        if largest is not None and largest <= cfg.fewshot.auto_max_per_class:
            console.print(f"train.mode=auto: at most {largest} training examples per class (<= "
                          f"fewshot.auto_max_per_class={cfg.fewshot.auto_max_per_class}), so this run uses "
                          "few-shot training (contrastive encoder + logistic head)")
            return "fewshot"
        return "standard"
    return mode


def check_fewshot(cfg, task, train_labels, label_names: list[str], world: int = 1) -> None:
    """What few-shot mode cannot do, as errors a user can act on (before anything is written)."""
    if world > 1:
        raise ConfigError(f"train.mode=fewshot runs in one process (it trains on a few dozen examples); it was "
                          f"started with {world} processes: run it without torchrun / accelerate launch")
    if "fewshot" not in task.modes:
        raise ConfigError(f"train.mode={cfg.train.mode!r} does not support task={task.name!r}: few-shot training is "
                          "for single-label classification (texts or text pairs); use train.mode=standard")
    if cfg.peft.method != "none":
        raise ConfigError(f"train.mode=fewshot fine-tunes the whole encoder; peft.method={cfg.peft.method!r} is not "
                          "supported with it: set peft.method=none")
    counts = class_counts(train_labels, len(label_names))
    few = {label_names[i]: int(c) for i, c in enumerate(counts) if c < 2}
    if few:
        raise DataError(f"train.mode=fewshot needs at least 2 training examples of every class (the contrastive "
                        f"phase pairs examples of the same class); too few: {few}. Add examples or drop the class")


class Embedder(nn.Module):
    """A MeanPoolClassifier seen as a sentence encoder: `logits` are its normalised embeddings (batch, hidden)."""

    def __init__(self, model: MeanPoolClassifier):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> Output:
        return Output(F.normalize(self.model.embed(input_ids, attention_mask, token_type_ids).float(), dim=-1))


def pair_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, weight), both (n, n) float, over the distinct pairs i < j of a batch with labels (n,).

    target: 1 for a same-class pair, 0 otherwise. weight: positives and negatives each carry half of the total
    (SetFit balances its sampled pairs the same way), so weight sums to 1; a batch with only one kind gives it all.
    """
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(1)
    pos, neg = same & upper, ~same & upper
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    share = 0.5 if n_pos and n_neg else 1.0
    weight = torch.zeros(same.shape)
    if n_pos:
        weight[pos] = share / n_pos
    if n_neg:
        weight[neg] = share / n_neg
    return same.float(), weight


def cosine_pair_loss(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SetFit's CosineSimilarityLoss (squared error of cos(a, b) against 1 / 0) over every pair of the batch.
    emb: (n, hidden) unit vectors; labels: (n,)."""
    target, weight = pair_targets(labels.cpu())
    sim = emb @ emb.T
    return (weight.to(emb.device) * (sim - target.to(emb.device)) ** 2).sum()


def supcon_loss(emb: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over the batch; anchors without a positive are skipped.
    emb: (n, hidden) unit vectors; labels: (n,)."""
    n = len(labels)
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    logits = (emb @ emb.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has_pos = pos.any(1)
    if not has_pos.any():
        return emb.sum() * 0.0
    mean_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[has_pos] / pos.sum(1)[has_pos]
    return -mean_pos.mean()


@torch.inference_mode()
def embed_all(model: MeanPoolClassifier, enc: Encoded, batch_size: int, device: torch.device,
              precision: str) -> torch.Tensor:
    """Normalised embeddings (n, hidden) float32 on CPU, in input order; length-sorted batches, no dropout."""
    was_training = model.training
    model.eval()
    out = None
    for idx in eval_batches(enc.lengths, batch_size):
        inputs = {k: v.to(device) for k, v in collate_inputs(enc, idx).items()}
        with autocast(device, precision):
            emb = F.normalize(model.embed(**inputs).float(), dim=-1).cpu()
        if out is None:
            out = torch.zeros(len(enc), emb.shape[1])
        out[torch.from_numpy(idx)] = emb
    model.train(was_training)
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_labels: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: minimise C * sum(cross-entropy) + ||W||^2 / 2 (bias not penalised), as
    scikit-learn's LogisticRegression(C) with lbfgs. x: (n, hidden), y: (n,) -> W (num_labels, hidden), b (num_labels,).
    Deterministic: full-batch L-BFGS in float64 from zeros."""
    x, y = x.double(), y.long()
    w = torch.zeros(num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-8, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = c * F.cross_entropy(x @ w.T + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


PROTOTYPE_SCALE = 20.0  # cosine similarities (in [-1, 1]) times 20 give softmax probabilities that are not all flat


def fit_prototype(x: torch.Tensor, y: torch.Tensor, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest class mean by cosine: W rows are the normalised class means (scaled), b = 0."""
    means = torch.stack([x[y == k].mean(0) for k in range(num_labels)])
    return PROTOTYPE_SCALE * F.normalize(means, dim=-1), torch.zeros(num_labels)


def contrastive_config(cfg, n_train: int):
    """The run config for the contrastive phase: fewshot.* replace the optimisation fields of train.*.
    Whole batches only (no micro-batches): the loss pairs examples across the batch."""
    phase = copy.deepcopy(cfg)
    t, f = phase.train, cfg.fewshot
    t.lr, t.head_lr, t.epochs, t.max_steps = f.lr, None, f.epochs, -1
    t.batch_size, t.micro_batch_size, t.auto_batch_size = min(f.batch_size, n_train), None, False
    t.batching, t.save_every, t.eval_every, t.early_stopping_patience = "random", -1, 0, 0
    return phase


def train_fewshot(model: MeanPoolClassifier, train: Encoded, cfg, task, label_names: list[str],
                  device: torch.device, precision: str, tracker, run_dir, resume_from=None) -> FitResult:
    """Contrastive phase (the training loop with a pair loss on `task`'s batches), then the head fitted on the
    train embeddings and written into model.classifier. Returns the loop's FitResult with train_seconds covering both phases."""
    start, cpu_start = time.perf_counter(), time.process_time()
    f = cfg.fewshot
    phase = contrastive_config(cfg, len(train))
    if f.loss == "cosine":
        def loss_fn(emb, batch):
            return cosine_pair_loss(emb, batch["labels"])
    else:
        def loss_fn(emb, batch):
            return supcon_loss(emb, batch["labels"], f.temperature)
    model.classifier.requires_grad_(False)  # the head is fitted afterwards, in closed form
    console.print(f"few-shot: contrastive phase ({f.loss} loss over all in-batch pairs), "
                  f"{phase.train.epochs:g} epochs of batch {phase.train.batch_size}, lr {f.lr:g}")
    fitted = fit(Embedder(model), train, None, phase, task, label_names, device, precision, tracker,
                 "loss", run_dir, loss_fn=loss_fn, resume_from=resume_from)  # a stopped run continues (Ctrl-C)
    model.classifier.requires_grad_(True)
    x = embed_all(model, train, cfg.eval.batch_size, device, precision)
    y = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
    w, b = (fit_logistic(x, y, len(label_names), f.head_c) if f.head == "logistic"
            else fit_prototype(x, y, len(label_names)))
    with torch.no_grad():
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(b)
    train_acc = float(((x @ w.T + b).argmax(-1) == y).float().mean())
    tracker.log({"step": fitted.state.step, "split": "fewshot_head", "head": f.head, "train_accuracy": train_acc})
    console.print(f"few-shot: {f.head} head fitted on {len(y)} embeddings (training accuracy {train_acc:.3f})")
    fitted.train_seconds, fitted.train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return fitted
