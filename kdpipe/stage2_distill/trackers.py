"""Experiment trackers: every record written to `metrics.jsonl` also goes to TensorBoard, MLflow or W&B.

The numbers are the same records, under the same names (`kd/kl`, `lr`, `tokens_per_s`, `eval/ppl`, ...);
the run config and the cache manifest's summary are logged as parameters. A resumed run continues the same
MLflow / W&B run (their ids are kept in the run directory's `trackers.json`) and TensorBoard log directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdpipe.errors import UserError
from kdpipe.jsonfile import read_json, write_json

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> package to install
IDS_FILE = "trackers.json"


def check_trackers(names: list[str]) -> list[str]:
    """The chosen trackers, each installed; `none` alone means none. Called before any model loads."""
    names = [n for n in dict.fromkeys(names) if n != "none"]
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"--report-to {name} is not a tracker kdpipe knows: choose from "
                            f"{', '.join([*TRACKERS, 'none'])}")
        try:
            __import__(TRACKERS[name])
        except ImportError:
            raise UserError(f"--report-to {name} needs its package: pip install {TRACKERS[name]} "
                            f"(or kdpipe[trackers])") from None
    return names


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value if isinstance(value, (int, float, bool, str)) else json.dumps(value, default=str)
    return out


def cache_summary(manifest) -> dict[str, Any]:
    t, d, s = manifest.teacher, manifest.data, manifest.signals
    return {"teacher": t.name, "architecture": t.architecture, "teacher_layers": t.num_layers,
            "vocab_size": t.vocab_size, "seq_len": d.seq_len, "num_sequences": d.num_sequences,
            "num_tokens": d.num_tokens, "packing": d.packing, "loss_mask": d.loss_mask or "none",
            "fingerprint": d.fingerprint[:16], "top_k": s.top_k, "temperatures": s.temperatures,
            "sample_count": s.sample_count, "hidden_layers": s.hidden_layers, "attention_layers": s.attention_layers}


class Trackers:
    """The chosen trackers of one run (rank 0 only); `log` takes a metrics.jsonl record."""

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any], cache: dict[str, Any]):
        self.run_dir, self._open = Path(run_dir), []
        ids = _read_ids(self.run_dir / IDS_FILE)
        params = flatten("", {"config": config, "cache": cache}, {})
        try:
            for name in names:
                self._open.append(getattr(self, f"_start_{name}")(ids.get(name), params))
        except UserError:
            self.close()
            raise
        write_json(self.run_dir / IDS_FILE, {name: tracker[1] for name, tracker in zip(names, self._open)
                                             if tracker[1] is not None})

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for log, _, _ in self._open:
            log(values, step)

    def close(self) -> None:
        for _, _, close in self._open:
            close()
        self._open = []

    # -- each tracker: (log(values, step), its run id or None, close()) ---------------------------
    def _start_tensorboard(self, _, params):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in sorted(params.items())))

        def log(values, step):
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        return log, None, writer.close

    def _start_mlflow(self, run_id, params):
        import time

        import mlflow
        from mlflow.entities import Metric

        # MLFLOW_TRACKING_URI where set; else a local SQLite store in the run directory (MLflow 3 keeps its
        # ./mlruns file store in maintenance mode and refuses it unless told to)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or local_mlflow_uri(self.run_dir)
        client = mlflow.MlflowClient(tracking_uri=uri)
        try:
            if run_id is None:
                experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "kdpipe")
                found = client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else client.create_experiment(experiment)
                run_id = client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
                for key, value in params.items():  # MLflow keeps params to 6000 characters
                    client.log_param(run_id, key[:250], str(value)[:6000])
            else:
                client.update_run(run_id, status="RUNNING")
        except Exception as exc:  # noqa: BLE001 - a tracking server's errors come in many types
            raise UserError(f"MLflow at {uri} refused the run ({type(exc).__name__}: {str(exc)[:200]}): check "
                            f"MLFLOW_TRACKING_URI, or drop --report-to mlflow") from None

        def log(values, step):
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        return log, run_id, lambda: client.set_terminated(run_id)

    def _start_wandb(self, run_id, params):
        import wandb

        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdpipe"), name=self.run_dir.name,
                             dir=str(self.run_dir), config=params, id=run_id, resume="allow" if run_id else None,
                             reinit="create_new")
        except Exception as exc:  # noqa: BLE001 - wandb raises its own errors, often for a missing login
            raise UserError(f"W&B would not start a run ({type(exc).__name__}: {str(exc)[:200]}): wandb login, or "
                            f"set WANDB_MODE=offline") from None
        return (lambda values, step: run.log(values, step=step)), run.id, run.finish


def local_mlflow_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def _read_ids(path: Path) -> dict[str, str]:
    ids = read_json(path)
    if ids is None:
        return {}
    if not isinstance(ids, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.isalnum()
                                            for k, v in ids.items()):
        raise UserError(f"{path} is damaged: delete it (the trackers then start new runs)")
    return ids
