"""Joining the process group that torchrun or the deepspeed launcher set up (or making a one-process one)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from kdpipe.errors import UserError


def distributed_env() -> tuple[int, int]:
    """(rank, world size) from torchrun / the deepspeed launcher; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_process_group(device: str) -> None:
    """Join (or, alone, create) the process group; gloo on CPU, nccl on GPUs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)


def leave_process_group() -> None:
    """Tear the process group down after a successful command, and end a rank of a multi-rank run there.

    A process that exits with gloo's worker threads alive can die with SIGABRT ("terminate called without an
    active exception") after its work is done, and the launcher then reports the whole run failed. Destroying
    the group did not always prevent it: a two-rank ZeRO extraction in CI wrote its complete cache and one
    rank then aborted at interpreter exit (once; 24 two-rank runs in a row after it did not repeat it; which
    destructor was not found). So a rank of a multi-rank run, once every rank has passed the barrier (the
    commands have closed their stores, trackers and files before they return), flushes its output and leaves
    with `os._exit(0)`, which runs no destructor. Only on success: after a failure the other ranks may be
    inside a collective, and a barrier here would hang."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    dist.barrier()
    dist.destroy_process_group()
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def read_deepspeed_json(path: str) -> dict[str, Any]:
    """A user's DeepSpeed config file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
