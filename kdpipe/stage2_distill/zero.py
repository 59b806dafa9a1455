"""DeepSpeed ZeRO (stage 1, 2 or 3) for the student: the user's JSON, with kdpipe's batch settings."""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.distributed import init_process_group, read_deepspeed_json


def wrap_student(model: nn.Module, optimizer: torch.optim.Optimizer, config_path: str, micro_batch: int,
                 grad_accum: int, clip: float, device: str):
    """A DeepSpeed engine around the student and kdpipe's AdamW. DeepSpeed accumulates gradients over
    `grad_accum` micro-batches itself, scales the loss, and clips."""
    import deepspeed

    config = read_deepspeed_json(config_path)
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch)
    config.setdefault("gradient_accumulation_steps", grad_accum)
    config.setdefault("gradient_clipping", clip)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.pop("train_batch_size", None)  # derived from the two above and the world size
    init_process_group(device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
