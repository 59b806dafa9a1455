"""The run directory of `kdpipe distill`: what it holds, who may write it, and a history nothing destroys.

- `run.json`: the config, split and methods of the run, with every earlier config of the same run kept
  under `history` (a run extended from 20 to 30 steps says so).
- `metrics.jsonl`: one record per step plus held-out evaluations; a resumed run drops only the records of
  steps after its checkpoint (they are redone, identically), never an earlier evaluation.
- `final.json`: held-out metrics before and after training, written last: a run is finished when it says
  `complete` at the requested number of steps. Resuming a finished run is a no-op that says so.
- `.kdpipe.lock`: one writer at a time (storage.lock).

Every file is written whole to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kdpipe.errors import UserError
from kdpipe.jsonfile import read_json, write_json
from kdpipe.storage.lock import LOCK_NAME, DirectoryLock

# what a run directory may hold; --overwrite removes nothing else
RUN_ENTRIES = {"run.json", "metrics.jsonl", "final.json", "checkpoints", "student", "kdpipe-step.json", "eval.json",
               "tensorboard", "mlruns", "wandb", "trackers.json", "mlflow.db"}


def is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith("metrics.rank") and name.endswith(".jsonl")) \
        or (name.startswith(".") and ".tmp-" in name)  # a file of ours cut short by a crash


class RunDir:
    """A run directory held for writing (locked) by this process."""

    def __init__(self, path: str | Path, resume: bool, overwrite: bool, rank: int = 0):
        self.path, self.rank = Path(path), rank
        self.check(resume, overwrite)
        self.lock = DirectoryLock(self.path, "run directory")
        self.resume, self.overwrite = resume, overwrite

    def check(self, resume: bool, overwrite: bool) -> None:
        """Before anything loads: an existing run is continued or replaced only when asked."""
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other: pick one")
        p = self.path
        for parent in [p, *p.parents]:
            if parent.exists() and not parent.is_dir():
                raise UserError(f"--out {p}: {parent} is a file, not a directory: choose another --out")
        entries = [e.name for e in p.iterdir() if e.name != LOCK_NAME] if p.is_dir() else []
        if not entries:
            return
        if not all(is_run_entry(name) for name in entries):
            strange = next(name for name in entries if not is_run_entry(name))
            raise UserError(f"{p} holds {strange!r}, which is not part of a kdpipe run: choose another --out "
                            f"(kdpipe will not delete it)")
        if not resume and not overwrite:
            raise UserError(f"{p} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                            f"or choose another --out")

    def __enter__(self) -> "RunDir":
        self.lock.acquire()
        try:
            if self.overwrite and self.rank == 0:
                for entry in self.path.iterdir():
                    if entry.name != LOCK_NAME and is_run_entry(entry.name):
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    # -- run.json -----------------------------------------------------------------------------------
    def previous(self) -> dict | None:
        return read_json(self.path / "run.json")

    def write_run(self, record: dict) -> None:
        """run.json, keeping earlier configs of the same run (resumed with other settings) as history."""
        old = self.previous()
        if old:
            history = old.pop("history", [])
            if old.get("config") != record.get("config"):
                history.append(old)
            record = {**record, "history": history}
        write_json(self.path / "run.json", record)

    # -- metrics ------------------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / ("metrics.jsonl" if self.rank == 0 else f"metrics.rank{self.rank}.jsonl")

    def metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash mid-write
        return rows

    def keep_metrics_until(self, step: int) -> list[dict]:
        """Rewrite metrics.jsonl with the records of steps <= `step` (those after it will be redone)."""
        rows = [r for r in self.metrics() if isinstance(r.get("step"), int) and r["step"] <= step]
        tmp = self.metrics_file.with_name(f".{self.metrics_file.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_file)
        return rows

    # -- final.json ---------------------------------------------------------------------------------
    def final(self) -> dict | None:
        return read_json(self.path / "final.json")

    def finished(self, steps: int) -> dict | None:
        """final.json of a run that completed exactly `steps` steps, else None."""
        final = self.final()
        if isinstance(final, dict) and final.get("complete") and final.get("steps") == steps:
            return final
        return None

    def write_final(self, record: dict) -> None:
        old = self.final()
        history = []
        if isinstance(old, dict):
            history = old.pop("history", [])
            if old.get("complete"):
                history.append(old)
        write_json(self.path / "final.json", {**record, "complete": True, "history": history})
