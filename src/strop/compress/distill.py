"""Distillation: a shallower student cut from the teacher, trained on the teacher's soft labels plus gold labels.

The student is the teacher with evenly spaced layers kept (every other layer for half the depth, last layer
included), initialised from the teacher's weights (embeddings, kept layers, pooler and head), so it starts close to
the teacher. Training reuses strop's loop (`training.loop.fit`) with a distillation loss instead of the task loss.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from strop.compress.prune import base_of, encoder_layers
from strop.device import autocast
from strop.errors import ExportError
from strop.evaluate.evaluator import MODEL_INPUTS
from strop.models.classifier import task_loss


def kept_layers(n_teacher: int, n_student: int) -> list[int]:
    """Indices of teacher layers the student keeps: evenly spaced, ending with the last one.
    6 -> 3 keeps [1, 3, 5] (every other layer); 12 -> 4 keeps [2, 5, 8, 11]."""
    if not 1 <= n_student < n_teacher:
        raise ExportError(f"--distill {n_student}: the student needs between 1 and {n_teacher - 1} layers "
                          f"(the teacher has {n_teacher})")
    step = n_teacher / n_student
    return [round((i + 1) * step) - 1 for i in range(n_student)]


def make_student(teacher: nn.Module, n_layers: int) -> nn.Module:
    """A copy of `teacher` with only `n_layers` of its encoder layers (weights copied, not shared)."""
    layers = encoder_layers(teacher)
    keep = kept_layers(len(layers), n_layers)
    student = copy.deepcopy(teacher)
    base = base_of(student)
    base.encoder.layer = nn.ModuleList([base.encoder.layer[i] for i in keep])
    for i, layer in enumerate(base.encoder.layer):  # layer_idx indexes caches; keep it consistent with the new depth
        att = getattr(layer.attention, "self", None)
        if att is not None and hasattr(att, "layer_idx"):
            att.layer_idx = i
    for config in {id(c): c for c in (student.config, base.config)}.values():
        config.num_hidden_layers = n_layers
    return student


def distillation_loss(teacher: nn.Module, task: str, temperature: float, alpha: float, device: torch.device,
                      precision: str):
    """loss_fn(student_logits, batch) for `fit`: alpha * soft loss + (1 - alpha) * task loss on gold labels.

    Soft loss: KL(teacher || student) on temperature-softened distributions times T^2 (single-label, Hinton et al.
    2015; T^2 keeps its gradient scale independent of T), BCE to the teacher's softened sigmoid (multi-label),
    MSE to the teacher's output (regression).
    """
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ExportError(f"distillation needs temperature > 0 and 0 <= alpha <= 1 (got {temperature}, {alpha})")
    teacher.eval().to(device)
    t = temperature

    def loss_fn(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        with torch.no_grad(), autocast(device, precision):
            target = teacher(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits
        student, target = logits.float(), target.float()
        if task == "single_label":
            soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(target / t, -1), reduction="batchmean",
                            log_target=True) * t * t
        elif task == "multi_label":
            soft = F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(target / t)) * t * t
        else:
            soft = F.mse_loss(student, target)
        return alpha * soft + (1 - alpha) * task_loss(student, batch["labels"], task)

    return loss_fn
