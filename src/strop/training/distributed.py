"""Multi-process data-parallel training with torch.distributed, started by `torchrun` or `accelerate launch`.

Both launchers set WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with WORLD_SIZE > 1 strop joins the
process group (gloo on CPU, NCCL on GPUs) and wraps the model in DistributedDataParallel. `train.batch_size` stays the
global batch: every rank draws the same seeded batches and takes a disjoint slice of each, so N processes x batch b
follow the same optimizer steps as 1 process x batch N*b, and a checkpoint (epoch, position in the epoch) resumes
under any process count. Only rank 0 writes the run folder, logs and checkpoints.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import torch

from strop.training.ds_engine import deepspeed_engine
from strop.training.optim import build_optimizer, build_scheduler, warmup_steps


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True in the process that writes files and logs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (each rank's batch loss -> the global batch's loss)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value / self.world

    def from_main(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed() -> Dist:
    """Join the process group when a launcher started several processes; a plain run gets Dist() (rank 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    for engine in ("FSDP", "DEEPSPEED"):  # accelerate launch --config_file with these sets ACCELERATE_USE_<ENGINE>
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true"):
            from strop.errors import ConfigError

            # accelerate's engine options would be silently ignored: strop's loop does its own wrapping
            raise ConfigError(f"the accelerate config asks for {engine}; strop wraps the model itself, so launch with "
                              "a plain multi-process config (accelerate launch --multi_gpu --num_processes N, or "
                              f"torchrun) and set train.distributed={engine.lower()}"
                              + (" train.deepspeed=ds_config.json" if engine == "DEEPSPEED" else ""))
    dist = torch.distributed
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # before NCCL starts: one GPU per process
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def shard(idx: np.ndarray, d: Dist, weight: float | None = None) -> tuple[np.ndarray, float]:
    """(this rank's examples of the global batch `idx`, what its loss is averaged over).

    Rank r takes idx[r::world]. `weight`: the global batch's weight (its examples by default; supervised tokens for
    generation, Task.batch_weight). Each rank's loss is a sum over its examples divided by weight / world, so DDP's
    mean over ranks is the mean over the whole global batch, also when the slices differ in size. A rank whose slice
    is empty (a last batch smaller than the process count) runs one example with weight 0: every rank must run
    backward for DDP's all-reduce.
    """
    weight = float(len(idx)) if weight is None else weight
    if d.world == 1:
        return idx, weight
    part = idx[d.rank::d.world]
    if len(part) == 0:
        return idx[:1], float("inf")
    return part, weight / d.world


def wrap_model(model: torch.nn.Module, d: Dist, device: torch.device, engine: str = "ddp") -> torch.nn.Module:
    """DDP around `model` (gradients are all-reduced in backward), or `model` itself sharded in place with FSDP2
    (engine='fsdp'); the plain module with one process. Build the optimizer after this: FSDP replaces parameters."""
    if d.world == 1:
        return model
    if engine == "fsdp":
        return shard_model(model)
    from torch.nn.parallel import DistributedDataParallel

    # static_graph: every step runs the same graph, so DDP learns once which parameters get no gradient (the pooler
    # under a mean-pooling head) instead of searching the graph each step as find_unused_parameters would
    return DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None,
                                   static_graph=True)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer state split over the ranks


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's transformer layers: the ModuleList with config.num_hidden_layers entries."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
            return list(module)
    from strop.errors import ConfigError

    raise ConfigError(f"train.distributed=fsdp: found no list of {n} transformer layers in {type(model).__name__} "
                      "to shard; use train.distributed=ddp for this model")


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 in place: each transformer layer is one unit (all-gathered just for its forward/backward), the rest
    (embeddings, head) the root unit. Gradients are reduce-scattered as averages over ranks, as DDP's all-reduce."""
    from torch.distributed.fsdp import fully_shard

    for layer in transformer_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _reshard(model: torch.nn.Module) -> None:
    # after a forward without backward (evaluation) the root unit keeps its parameters gathered; the shards are
    # what the optimizer and named_parameters() must see
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters (this rank's shards under FSDP) and of the batch-norm statistics training
    updates (CNNs), to restore the best weights later."""
    if is_sharded(model):
        _reshard(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    weights.update({n: b.detach().clone() for n, b in model.named_buffers()
                    if n.endswith((".running_mean", ".running_var", ".num_batches_tracked"))})
    return weights


def full_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors of a trainable_snapshot (FSDP shards are gathered: collective, every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {n: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for n, v in weights.items()}


def _full_options(full: bool = True, **extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, **extra)


def _optimizer_fqns(model: torch.nn.Module, optimizer) -> list[str]:
    """Parameter names in the optimizer's order: a one-process optimizer numbers its parameters 0, 1, ... so."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) of a sharded model as a one-process run's state_dict()s, on rank 0; ({}, {}) on the
    others. Collective: every rank must call it. Same files as without FSDP, so checkpoints resume under any
    process count and engine."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    _reshard(model)  # the optimizer's parameters are the shards
    weights = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    named = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not named:
        return weights, {}
    index = {fqn: i for i, fqn in enumerate(_optimizer_fqns(model, optimizer))}
    groups = [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in named["param_groups"]]
    return weights, {"state": {index[fqn]: v for fqn, v in named["state"].items()}, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer, weights: dict, optimizer_state: dict | None) -> None:
    """Load one-process state_dict()s (every rank passes the whole of them) into a sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    _reshard(model)
    if any(isinstance(v, DTensor) for v in weights.values()):  # a snapshot of this run's own shards: copy back
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
    else:  # full tensors: each rank keeps its shard
        set_model_state_dict(model, weights, options=_full_options(strict=False))
    if optimizer_state is not None:
        fqns = _optimizer_fqns(model, optimizer)
        named = {"state": {fqns[i]: v for i, v in optimizer_state["state"].items()},
                 "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]}
                                  for g in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, named, options=_full_options())


def unshard(model: torch.nn.Module, d: Dist, rebuild) -> torch.nn.Module | None:
    """After training: the full weights in a plain model from `rebuild()` on rank 0 (for the final evaluation and
    model/, identical to a one-process run's); None on the other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    weights = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    if not d.main:
        return None
    plain = rebuild()
    plain.load_state_dict(weights)
    return plain


def training_engine(model, t, dist: Dist, device: torch.device, lr_scales: dict, total_steps: int):
    """(module to train through, optimizer, scheduler, DeepSpeed engine or None) for this process layout.

    DDP: a wrapper that all-reduces gradients (`model` itself evaluates and saves); FSDP: `model` sharded in place;
    DeepSpeed (several processes): ZeRO's engine, which reduces gradients in its backward and clips in its step.
    The optimizer is built after wrapping: FSDP replaces the parameters, and ZeRO takes only torch's own AdamW
    class (no lazy sparse rows)."""
    ddp_model = wrap_model(model, dist, device, t.distributed)
    deepspeed = t.distributed == "deepspeed" and dist.world > 1
    optimizer = build_optimizer(model, t, lr_scales, lazy_rows=not deepspeed)
    scheduler = build_scheduler(optimizer, t.scheduler, warmup_steps(t.warmup, total_steps), total_steps)
    engine = None
    if deepspeed:
        engine, optimizer = deepspeed_engine(model, optimizer, t, dist.world)  # ZeRO wraps the AdamW
        ddp_model = engine
    return ddp_model, optimizer, scheduler, engine
