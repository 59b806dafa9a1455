"""Training checkpoints: everything a resumed run needs to continue exactly where it stopped."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

PATTERN = re.compile(r"step_(\d+)\.pt$")


def save(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "step": step, "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a truncated checkpoint under the real name
    for old in sorted(directory.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest(directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob("step_*.pt") if PATTERN.search(p.name))
    return found[-1] if found else None


def load(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["rng"])
    return state
