"""Training checkpoints as data, never code: tensors in safetensors, everything else in JSON.

A checkpoint is a directory `step_0000020/` with `tensors.safetensors` (student, optimizer and method
tensors, the RNG state) and `state.json` (the nested structure, each tensor named by its key in the
safetensors file). Nothing in either file can execute when loaded, so a run directory from someone
else is safe to resume. A checkpoint is written to a temporary directory and renamed into place: a
crash or a full disk mid-save never leaves a truncated checkpoint under a real name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.errors import UserError

PATTERN = re.compile(r"^step_(\d{7})$")
TENSORS, STATE = "tensors.safetensors", "state.json"


def encode(obj: Any, tensors: dict[str, torch.Tensor], seen: dict | None = None) -> Any:
    """A JSON-able copy of `obj` with its tensors moved into `tensors` (tied tensors stored once)."""
    seen = {} if seen is None else seen
    if torch.is_tensor(obj):
        t = obj.detach().cpu()
        # tied weights (an LM head and its embedding) share storage: store them once, load them tied
        same = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if same in seen:
            return {"__tensor__": seen[same]}
        key = f"t{len(tensors)}"
        tensors[key] = t.contiguous()
        if same is not None:
            seen[same] = key
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, seen) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, seen), encode(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors, seen) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with its I/O failures (a full disk) raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        raise


def write(path: Path, state: dict[str, Any]) -> None:
    """`state` as a checkpoint directory at `path`, atomically (temporary directory, then rename)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        tensors: dict[str, torch.Tensor] = {}
        structure = encode(state, tensors)
        save_tensors(tensors, tmp / TENSORS)
        (tmp / STATE).write_text(json.dumps(structure))
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        if path.exists():  # the same step saved again: the new one replaces it whole
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / TENSORS))
        return decode(json.loads((path / STATE).read_text()), tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UserError(f"checkpoint {path} is damaged or not a kdpipe checkpoint ({type(exc).__name__}): "
                        f"remove it to resume from the one before, or start again with --overwrite") from None


def save(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    path = directory / f"step_{step:07d}"
    write(path, {**state, "step": step, "rng": torch.get_rng_state()})
    for old in all_steps(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def all_steps(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.match(p.name) and p.is_dir())


def latest(directory: Path) -> Path | None:
    found = all_steps(directory)
    if not found and directory.is_dir() and any(directory.glob("step_*.pt")):
        raise UserError(f"{directory} holds checkpoints in the pickle format of kdpipe 0.1, which could run code "
                        f"when loaded; kdpipe no longer loads them: start the run again with --overwrite")
    return found[-1] if found else None


def load(path: Path) -> dict[str, Any]:
    state = read(path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not torch.is_tensor(state.get("rng")):
        raise UserError(f"checkpoint {path} is damaged or not a kdpipe checkpoint (no step or RNG state)")
    torch.set_rng_state(state["rng"])
    return state


# -- the training state of a run: the student, the optimizer, the methods, the schedule -----------------
def save_training(directory: Path, step: int, model, methods, optimizer, scheduler, engine, extra: dict) -> None:
    """A checkpoint of everything a resumed run needs. Under DeepSpeed ZeRO the student and optimizer are
    partitioned and saved by DeepSpeed (its own files, loaded back with `weights_only=True`); the rest is
    ours. Either way the directory appears under its real name only once complete."""
    state = {"methods": [mt.state_dict() for mt in methods], "scheduler": scheduler.state_dict(), **extra}
    if engine is None:
        save(directory, step, {**state, "student": model.state_dict(), "optimizer": optimizer.state_dict()})
        return
    import torch.distributed as dist

    tag = f"step_{step:07d}"
    tmp = f"{tag}.tmp-ds"
    engine.save_checkpoint(str(directory), tag=tmp, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        target = directory / tmp
        tensors: dict[str, torch.Tensor] = {}
        structure = encode({**state, "step": step, "rng": torch.get_rng_state()}, tensors)
        save_tensors(tensors, target / TENSORS)
        (target / STATE).write_text(json.dumps(structure))
        final = directory / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(target, final)
        for old in all_steps(directory)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def restore_training(directory: Path, model, methods, optimizer, scheduler, engine) -> dict | None:
    """Load the latest checkpoint into the run's objects; its state (step, split...), or None if none."""
    path = latest(directory)
    if path is None:
        return None
    state = load(path)
    try:
        if engine is not None:
            with safe_deepspeed_loads(engine):
                loaded, _ = engine.load_checkpoint(str(directory), tag=path.name)
            if loaded is None:
                raise UserError(f"DeepSpeed found no checkpoint in {path}")
        else:
            model.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
        for mt, sd in zip(methods, state["methods"]):
            mt.load_state_dict(sd)
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: {str(exc)[:200]}): resume "
                        f"with the run's own --student and --method, or start again with --overwrite") from None
    return state


class safe_deepspeed_loads:
    """While active, DeepSpeed reads checkpoint files with `torch.load(weights_only=True)`: tensors and
    plain containers, plus the three DeepSpeed records its optimizer states hold, nothing that runs code."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [LossScaler, ZeroStageEnum, fragment_address]
        ckpt = self.engine.checkpoint_engine

        def load(path, map_location=None):
            import pickle

            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise UserError(f"DeepSpeed checkpoint file {path} holds something other than tensors and plain "
                                f"data, which kdpipe will not load ({str(exc).splitlines()[0][:160]})") from None

        self._saved = ckpt.__dict__.get("load")
        ckpt.load = load
        return self

    def __exit__(self, *exc):
        ckpt = self.engine.checkpoint_engine
        if self._saved is None:
            del ckpt.load
        else:
            ckpt.load = self._saved
