"""Teacher engines. `hf`: plain transformers. `deepspeed`: ZeRO stage 3 inference (ZeRO-Inference) with
parameters offloaded to CPU or NVMe and streamed in layer by layer, for teachers that do not fit.

Both hand back the bare `nn.Module`, so the same capture hooks and head slicing work on either:
under ZeRO-3 each module's parameters are gathered by DeepSpeed's own hooks when it is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from kdpipe.distributed import distributed_env, init_process_group, read_deepspeed_json
from kdpipe.errors import UserError
from kdpipe.modelio import TeacherSource, load_config, load_teacher


T = TypeVar("T")


@dataclass
class Ranks:
    """This process's place among the extraction ranks, with the few collectives extraction needs."""
    rank: int = 0
    world: int = 1
    distributed: bool = False

    @classmethod
    def from_env(cls, device: str, needed: bool = False) -> "Ranks":
        rank, world = distributed_env()
        if world == 1 and not needed:
            return cls()
        init_process_group(device)
        return cls(rank, world, True)

    @property
    def label(self) -> str:
        return f" [rank {self.rank}/{self.world}]" if self.world > 1 else ""

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value: T) -> T:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 while the others wait; if it fails, every rank fails with its message."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as exc:
                error = exc
        message = self.share(None if error is None else str(error) or type(error).__name__)
        if error is not None:
            raise error
        if message is not None:
            raise UserError(f"rank 0 failed: {message}")
        return result


def deepspeed_config(dtype: str, offload: str, nvme_path: str | None, user_config: str | None,
                     largest_param: int) -> dict[str, Any]:
    """kdpipe's ZeRO-3 inference settings, under the user's JSON where it says otherwise."""
    config = read_deepspeed_json(user_config) if user_config else {}
    zero = config.setdefault("zero_optimization", {})
    if zero.setdefault("stage", 3) != 3:
        raise UserError(f"--engine deepspeed runs ZeRO stage 3 inference; {user_config} sets stage {zero['stage']}")
    param = zero.setdefault("offload_param", {})
    param.setdefault("device", offload)
    param.setdefault("pin_memory", torch.cuda.is_available())
    if param["device"] == "nvme":
        if not nvme_path:
            raise UserError("--offload nvme needs --nvme-path DIR (a directory on a fast local disk)")
        Path(nvme_path).mkdir(parents=True, exist_ok=True)
        param.setdefault("nvme_path", str(nvme_path))
        # the swap buffers must hold the largest parameter (an embedding matrix, usually)
        param.setdefault("buffer_size", max(int(1e8), largest_param))
        param.setdefault("buffer_count", 5)
    zero.setdefault("stage3_param_persistence_threshold", 0)  # stream every parameter, keep none resident
    if dtype == "bfloat16":
        config.setdefault("bf16", {"enabled": True})
    elif dtype == "float16":
        config.setdefault("fp16", {"enabled": True})
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    return config


def load_deepspeed_teacher(source: TeacherSource, dtype: str, device: str, offload: str, nvme_path: str | None,
                           user_config: str | None, trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """The teacher under ZeRO-3 inference. Weights are loaded under `deepspeed.zero.Init` (through
    transformers' HfDeepSpeedConfig), so no process ever holds the whole model."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    init_process_group(device)
    config = load_config(source, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    largest = int(getattr(text, "vocab_size", 0) or 0) * int(getattr(text, "hidden_size", 0) or 0)
    ds_config = deepspeed_config(dtype, offload, nvme_path, user_config, largest)
    keep_alive = HfDeepSpeedConfig(ds_config)  # while alive, from_pretrained builds under zero.Init
    if source.gguf_file and dtype == "float32" and offload == "nvme":
        raise UserError("a GGUF teacher cannot be built under zero.Init: use --offload cpu, or --dtype bfloat16")
    model = load_teacher(source, dtype, "cpu", trust_remote_code)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    del keep_alive
    return engine.module, ds_config
