"""Trackers for real: TensorBoard event files, a local MLflow store and an offline W&B run are read back and
hold the same numbers as metrics.jsonl; a resumed run continues the same tracker runs."""

import glob
import json
import struct

import pytest

from kdpipe.errors import UserError
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.trackers import local_mlflow_uri
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from tiny import save_teacher


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("trackers")
    teacher = save_teacher(root / "teacher", "llama", sharpness=30)
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(root / "cache"), seq_len=32, top_k=16,
                          sequences_per_unit=4, quiet=True))
    return root / "cache"


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_history(run):
    """The history records of the offline runs' transaction logs (LevelDB log blocks of W&B Record protobufs).
    A resumed offline run is a second directory of the same run id (`wandb sync` joins them)."""
    paths = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb")))
    ids = json.loads((run / "trackers.json").read_text())["wandb"]
    assert len(paths) == 2 and all(p.endswith(f"run-{ids}.wandb") for p in paths)
    return [row for path in paths for row in _wandb_rows(path)]


def _wandb_rows(path):
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, block, parts, rows = open(path, "rb").read(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (n == 0 and kind == 0):
            pos += left
            continue
        parts, pos = parts + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last part of one
            record = pb.Record()
            record.ParseFromString(parts)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
                rows[-1].setdefault("_step", record.history.step.num)
            parts = b""
    return rows


def test_every_tracker_holds_what_metrics_jsonl_holds(small_cache, tmp_path, monkeypatch):
    import mlflow
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    cfg = dict(cache=[str(small_cache)], student="teacher:layers=2", out=str(run), method=["kd", "lm:weight=0.5"],
               steps=4, batch_size=4, eval_every=2, eval_sequences=4, quiet=True,
               report_to=["tensorboard", "mlflow", "wandb"])
    distill(DistillConfig(**cfg))
    distill(DistillConfig(**{**cfg, "steps": 6, "resume": True}))  # continues the same tracker runs
    want = records(run)
    assert [r["step"] for r in want] == [0, 1, 2, 3, 4, 5, 6]
    keys = {k for r in want for k in r if k != "step"}
    assert {"kd/kd", "lm/lm", "lr", "tokens_per_s", "eval/ppl", "eval/kl_teacher"} <= keys

    scalars = tensorboard_scalars(run)
    client = mlflow.MlflowClient(tracking_uri=local_mlflow_uri(run))
    ids = json.loads((run / "trackers.json").read_text())
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.data.params["config.method"] == json.dumps(["kd", "lm:weight=0.5"])
    assert mlflow_run.data.params["cache.top_k"] == "16" and mlflow_run.info.status == "FINISHED"
    history = {step: row for row in wandb_history(run) for step in [row["_step"]]}
    for key in keys:
        logged = {r["step"]: r[key] for r in want if key in r}
        assert scalars[key] == pytest.approx(logged, rel=1e-6), key
        assert {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, key)} == \
            pytest.approx(logged, rel=1e-12), key
        assert {s: history[s][key] for s in logged} == pytest.approx(logged, rel=1e-12), key


def test_an_unknown_or_missing_tracker_is_one_line_before_anything_loads(small_cache, tmp_path):
    cfg = dict(cache=[str(small_cache)], student="teacher:layers=2", out=str(tmp_path / "run"), steps=1)
    with pytest.raises(UserError, match="--report-to comet is not a tracker kdpipe knows: choose from tensorboard"):
        distill(DistillConfig(**cfg, report_to=["comet"]))
    assert not (tmp_path / "run").exists()
