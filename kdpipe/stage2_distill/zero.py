"""DeepSpeed ZeRO (stage 1, 2 or 3) for the student: the user's JSON, with kdpipe's batch settings."""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.distributed import init_process_group, read_deepspeed_json


class Trainable(nn.Module):
    """The student and the methods' own trainable parts (projections, extra heads, policies) as one
    module: DeepSpeed partitions, updates and checkpoints only the parameters of the module it is given,
    and a method's projection left outside it breaks ZeRO-2 and ZeRO-3."""

    def __init__(self, student: nn.Module, methods: list[nn.Module]):
        super().__init__()
        self.student = student
        self.methods = nn.ModuleList(methods)


def wrap_student(student: nn.Module, methods: list[nn.Module], lr: float, weight_decay: float, config_path: str,
                 micro_batch: int, grad_accum: int, clip: float, device: str):
    """A DeepSpeed engine around the student and the methods' parts; returns (engine, the torch optimizer
    that steps, whose learning rate a scheduler sets; ZeRO wraps it). DeepSpeed accumulates gradients over `grad_accum` micro-batches itself, scales the loss, and
    clips. kdpipe's AdamW is used unless the JSON has an `optimizer` section (then DeepSpeed builds that
    one, e.g. its CPU Adam for `offload_optimizer`); with kdpipe's, ZeRO-Offload steps it on the CPU."""
    import deepspeed

    config = read_deepspeed_json(config_path)
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch)
    config.setdefault("gradient_accumulation_steps", grad_accum)
    config.setdefault("gradient_clipping", clip)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)  # kdpipe's AdamW is fine on offloaded parameters
    config.pop("train_batch_size", None)  # derived from the two above and the world size
    init_process_group(device)
    module = Trainable(student, methods)
    params = [p for p in module.parameters() if p.requires_grad]
    if "optimizer" in config:
        engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config)
    else:
        client = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        engine, *_ = deepspeed.initialize(model=module, optimizer=client, config=config)
    return engine, getattr(engine.optimizer, "optimizer", engine.optimizer)
