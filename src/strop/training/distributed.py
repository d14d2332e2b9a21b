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

            raise ConfigError(f"the accelerate config asks for {engine}, but strop trains with DDP only (each process "
                              "holds the whole model; fine up to a few hundred million parameters); launch with a "
                              "plain multi-process config, e.g. accelerate launch --multi_gpu --num_processes N")
    dist = torch.distributed
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # before NCCL starts: one GPU per process
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def shard(idx: np.ndarray, d: Dist) -> tuple[np.ndarray, float]:
    """(this rank's examples of the global batch `idx`, the count its loss is averaged over).

    Rank r takes idx[r::world]. Each rank's loss is a sum over its examples divided by len(idx) / world, so DDP's
    mean over ranks is the mean over the whole global batch, also when the slices differ in size. A rank whose slice
    is empty (a last batch smaller than the process count) runs one example with weight 0: every rank must run
    backward for DDP's all-reduce.
    """
    if d.world == 1:
        return idx, float(len(idx))
    part = idx[d.rank::d.world]
    if len(part) == 0:
        return idx[:1], float("inf")
    return part, len(idx) / d.world


def wrap_model(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """DDP around `model` (gradients are all-reduced in backward); the plain module with one process."""
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # static_graph: every step runs the same graph, so DDP learns once which parameters get no gradient (the pooler
    # under a mean-pooling head) instead of searching the graph each step as find_unused_parameters would
    return DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None,
                                   static_graph=True)
