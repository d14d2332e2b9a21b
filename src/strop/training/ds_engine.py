"""train.distributed=deepspeed: DeepSpeed ZeRO (stage 0, 1 or 2) under strop's own loop.

The user's DeepSpeed JSON passes through for what DeepSpeed alone decides (zero_optimization and its bucket sizes,
communication options, logging); what strop's train section already says is filled in from it and may not be
contradicted: the batch (train.batch_size over the processes, no accumulation inside DeepSpeed), gradient clipping
(train.max_grad_norm), the optimizer (strop's AdamW) and the schedule (strop's, stepped by the loop). ZeRO-3 and
fp16/bf16 engines are refused: they were not tested here (FSDP covers parameter sharding: train.distributed=fsdp).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from strop.errors import ConfigError

STRATEGY_KEYS = {"optimizer": "train.lr, train.weight_decay, train.betas (strop's AdamW)",
                 "scheduler": "train.scheduler and train.warmup", "fp16": "train.precision", "bf16": "train.precision",
                 "amp": "train.precision"}


def read_ds_config(path: str, t, world: int) -> dict:
    """The DeepSpeed JSON at `path` with strop's batch and clipping filled in; errors name the file and the key."""
    file = Path(path)
    try:
        ds = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed={path!r}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed={path!r} is not a readable JSON file ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed={path!r} must hold a JSON object, got {type(ds).__name__}")
    for key, instead in STRATEGY_KEYS.items():
        # a disabled fp16/bf16 block says nothing; anything else would fight strop's own setting
        disabled = key not in ("optimizer", "scheduler") and isinstance(ds.get(key), dict) and ds[key].get(
            "enabled") is False
        if key in ds and not disabled:
            raise ConfigError(f"{path}: {key!r} is set by strop's config ({instead}); remove it from the DeepSpeed "
                              "JSON")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r}; strop runs DeepSpeed ZeRO stages 0, 1 and 2 "
                          "(for sharded parameters, ZeRO-3's job, use train.distributed=fsdp)")
    micro = math.ceil(t.batch_size / world)  # each process's slice of the global batch (distributed.shard)
    filled = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "train_batch_size": micro * world, "gradient_clipping": float(t.max_grad_norm)}
    for key, value in filled.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: {key}={ds[key]!r} contradicts strop's train section (which gives {value}: "
                              "train.batch_size is the global batch split over the processes, train.max_grad_norm "
                              "the clipping); use \"auto\" or leave it out")
    if t.micro_batch_size and t.micro_batch_size < micro or t.auto_batch_size:
        raise ConfigError(f"train.distributed=deepspeed runs each process's slice of the batch ({micro} examples) "
                          "in one pass; drop train.micro_batch_size and train.auto_batch_size, or use "
                          "train.distributed=ddp or fsdp for gradient accumulation")
    return {**ds, **filled}


def deepspeed_engine(model, optimizer, t, world: int):
    """(DeepSpeed engine around `model`, its ZeRO optimizer wrapping `optimizer`). strop's scheduler keeps driving
    the learning rate: ZeRO steps the wrapped optimizer's param_groups, the ones the scheduler sets."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("train.distributed=deepspeed needs DeepSpeed; pip install 'strop[deepspeed]' (on a "
                          "CPU-only machine it builds its CPU ops with the system C++ compiler)") from None
    ds = read_ds_config(t.deepspeed, t, world)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine, ds_optimizer
