"""DeepSpeed ZeRO (stage 1, 2 or 3) for the student: the user's JSON, with kdpipe's batch settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kdpipe.distributed import init_process_group
from kdpipe.errors import UserError


def wrap_student(model: nn.Module, optimizer: torch.optim.Optimizer, config_path: str, micro_batch: int,
                 grad_accum: int, clip: float, device: str):
    """A DeepSpeed engine around the student and kdpipe's AdamW. DeepSpeed accumulates gradients over
    `grad_accum` micro-batches itself, scales the loss, and clips."""
    import deepspeed

    try:
        config = json.loads(Path(config_path).read_text())
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {config_path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"DeepSpeed config {config_path} is not valid JSON: {exc}") from None
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch)
    config.setdefault("gradient_accumulation_steps", grad_accum)
    config.setdefault("gradient_clipping", clip)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.pop("train_batch_size", None)  # derived from the two above and the world size
    init_process_group(device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
