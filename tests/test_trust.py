"""Integrity and security, tried as an adversary would, through the CLI on real stores on disk: nothing
loaded from a file runs code, a missing or damaged chunk never reaches training, a resume with another
teacher is refused, one writer at a time, recipes and metadata are input."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdpipe.storage.lock import DirectoryLock
from kdpipe.storage.reader import TeacherCache
from test_cli import assert_user_error, extract_args, kdpipe
from tiny import save_teacher, small_disk


class RunsCode:
    """Unpickling this runs a shell command: the marker file appears if anything loads it unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def cache(teachers, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "cache"
    result = kdpipe(*extract_args(teachers["llama"], corpus, out, "--hidden-layers", "3"))
    assert result.exit_code == 0, result.output
    return out


def copy_of(cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "cache"
    shutil.copytree(cache, target)
    return target


def distill_args(cache: Path, out: Path, *extra: str) -> list:
    return ["distill", "--cache", cache, "--student", "teacher:layers=1", "--out", out, "--steps", "4",
            "--batch-size", "4", "--eval-sequences", "8", "--save-every", "2", "--quiet", *extra]


def test_checkpoints_are_safetensors_and_json_and_a_pickled_one_never_runs(cache, tmp_path):
    run = tmp_path / "run"
    assert kdpipe(*distill_args(cache, run)).exit_code == 0
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_0000002", "step_0000004"]
    for step in steps:
        assert sorted(p.name for p in (run / "checkpoints" / step).iterdir()) == ["state.json", "tensors.safetensors"]

    # the pickle format of kdpipe 0.1, crafted: refused by name, never unpickled
    marker = tmp_path / "pwned"
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "run.json").write_text("{}")
    torch.save({"student": RunsCode(marker), "step": 1}, legacy / "checkpoints" / "step_0000001.pt")
    assert_user_error(kdpipe(*distill_args(cache, legacy, "--resume")), "pickle format", "--overwrite")
    assert not marker.exists()

    # a damaged state.json or tensor file: one line naming the checkpoint
    (run / "final.json").unlink()
    state = run / "checkpoints" / "step_0000004" / "state.json"
    state.write_text(state.read_text()[:50])
    assert_user_error(kdpipe(*distill_args(cache, run, "--resume")), "step_0000004 is damaged")


def test_deepspeed_checkpoint_with_code_in_it_is_refused(cache, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    args = [str(a) for a in distill_args(cache, run, "--deepspeed", ds)]
    proc = subprocess.run([sys.executable, "-m", "kdpipe.cli", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run / "final.json").unlink()
    marker = tmp_path / "pwned"
    model_file = run / "checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt"
    assert model_file.exists()
    torch.save({"module": RunsCode(marker)}, model_file)
    proc = subprocess.run([sys.executable, "-m", "kdpipe.cli", *args, "--resume"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds something other than tensors" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("array,chunk", [("logits/topk_values", "c/1/0/0"), ("tokens/input_ids", "c/1/0"),
                                         ("hidden/layer_003", "c/2/0/0")])
def test_a_deleted_chunk_fails_verify_and_never_reaches_training(array, chunk, cache, corpus, teachers, tmp_path):
    store = copy_of(cache, tmp_path)
    (store / array / chunk).unlink()  # sequences 8..15 or 16..23
    first = int(chunk.split("/")[1]) * 8
    verified = kdpipe("verify", store)
    assert_user_error(verified, f"unit {first // 8} (sequences {first}..{first + 7})", "--repair")
    assert f"{array}: chunk of sequences {first}..{first + 7} is missing" in verified.stdout

    method = "distilbert" if array.startswith("hidden") else "kd"
    trained = kdpipe(*distill_args(store, tmp_path / "run", "--method", method, "--eval-sequences", "0", "--steps", "12"))
    assert_user_error(trained, array, "is missing", "kdpipe verify --repair")

    assert_user_error(kdpipe("verify", store, "--repair"), "ledger flags cleared")
    again = kdpipe(*extract_args(teachers["llama"], corpus, store, "--hidden-layers", "3", "--resume"))
    assert again.exit_code == 0, again.output
    assert kdpipe("verify", store).exit_code == 0
    for name in ("logits/topk_values", "tokens/input_ids", "hidden/layer_003"):
        np.testing.assert_array_equal(zarr.open_array(str(store / name))[:], zarr.open_array(str(cache / name))[:])


def test_a_deleted_ledger_flag_of_a_complete_cache_is_damage(cache, tmp_path):
    store = copy_of(cache, tmp_path)
    (store / "ledger" / "done" / "c" / "2").unlink()
    assert_user_error(kdpipe("verify", store), "unit 2", "--repair")
    assert_user_error(kdpipe(*distill_args(store, tmp_path / "run")), "not marked done", "kdpipe verify --repair")


def test_a_corrupt_chunk_during_training_is_one_line_without_noise(cache, tmp_path):
    store = copy_of(cache, tmp_path)
    chunk = store / "logits" / "topk_ids" / "c" / "3" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    args = [str(a) for a in distill_args(store, tmp_path / "run", "--eval-sequences", "0", "--steps", "12")]
    proc = subprocess.run([sys.executable, "-m", "kdpipe.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "logits/topk_ids, chunk of sequences 24..31, is damaged" in lines[0] and "verify --repair" in lines[0]


def test_resume_with_another_teacher_or_tokenizer_is_refused(teachers, corpus, tmp_path):
    a = save_teacher(tmp_path / "a", "llama", seed=0)
    b = save_teacher(tmp_path / "b", "llama", seed=1)  # same config, other weights
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    out = tmp_path / "cache"
    assert kdpipe(*extract_args(a, corpus, out)).exit_code == 0
    store = zarr.open_group(str(out), mode="r+")
    store["ledger/done"][1:] = 0  # as if interrupted
    store.attrs["kdpipe"] = dict(store.attrs["kdpipe"]) | {"complete": False}
    assert_user_error(kdpipe(*extract_args(b, corpus, out, "--resume")), "the teacher's weights")
    tok = tmp_path / "tok"
    shutil.copytree(a, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg | {"model_max_length": 7, "unk_token": "[PAD]"}))
    assert_user_error(kdpipe(*extract_args(a, corpus, out, "--resume", "--tokenizer", tok)), "the tokenizer")
    assert kdpipe(*extract_args(a, corpus, out, "--resume")).exit_code == 0
    assert TeacherCache(out).manifest.complete


def hold_lock_then_die(directory: Path) -> int:
    """A process that takes the lock and is killed with SIGKILL holding it; returns its pid."""
    code = (f"import os, signal; from kdpipe.storage.lock import DirectoryLock; "
            f"DirectoryLock({str(directory)!r}, 'x').acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return proc.pid


def test_one_writer_per_cache_and_per_run_and_stale_locks_are_taken_over(cache, teachers, corpus, tmp_path):
    store = copy_of(cache, tmp_path)
    run = tmp_path / "run"
    host = socket.gethostname()
    with DirectoryLock(store, "teacher cache"):  # a live writer: this test process
        assert_user_error(kdpipe(*extract_args(teachers["llama"], corpus, store, "--hidden-layers", "3", "--resume")),
                          "is in use by", f"pid {os.getpid()} on host {host}")
        assert_user_error(kdpipe("verify", store, "--repair"), "is in use by")
        assert kdpipe("verify", store).exit_code == 0, "readers need no lock"
    run.mkdir()
    with DirectoryLock(run, "run directory"):
        assert_user_error(kdpipe(*distill_args(store, run)), "is in use by", f"pid {os.getpid()}")
    assert not (run / "metrics.jsonl").exists(), "the refused writer wrote nothing"

    dead = hold_lock_then_die(store)
    resumed = kdpipe(*extract_args(teachers["llama"], corpus, store, "--hidden-layers", "3", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert f"took over the lock of pid {dead}" in resumed.stderr
    assert not (store / ".kdpipe.lock").exists(), "a finished writer leaves no lock"
    hold_lock_then_die(run)
    assert kdpipe(*distill_args(store, run)).exit_code == 0


def test_two_distills_into_one_run_directory_the_second_stops_at_once(cache, tmp_path):
    run = tmp_path / "run"
    args = [str(a) for a in distill_args(cache, run, "--steps", "200", "--save-every", "0")]
    first = subprocess.Popen([sys.executable, "-m", "kdpipe.cli", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (run / "metrics.jsonl").exists(), "the first run started"
        started = time.time()
        second = subprocess.run([sys.executable, "-m", "kdpipe.cli", *args, "--resume"], capture_output=True, text=True)
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr[-2000:]
        assert time.time() - started < 30
        assert first.poll() is None, "the first is still running"
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(0, 201)), "one writer's records, in order"


def test_recipe_step_names_are_not_paths_and_remote_code_needs_the_flag(teachers, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[steps."../../../escaped"]\nkind = "eval"\nstudent = "x"\ncache = "y"\n')
    assert_user_error(kdpipe("run", recipe, "--workdir", tmp_path / "w"), "step name", "not allowed")
    assert not (tmp_path.parent.parent / "escaped").exists()
    recipe.write_text(f'[steps.t]\nkind = "extract"\nteacher = "{teachers["llama"]}"\ndata = "x"\n'
                      f'trust_remote_code = true\n')
    assert_user_error(kdpipe("run", recipe, "--workdir", tmp_path / "w"), "trust_remote_code",
                      "kdpipe run --trust-remote-code")
    recipe.write_text('vars = "x"\n[steps.a]\nkind = "eval"\n')
    assert_user_error(kdpipe("run", recipe), "must be tables")
    recipe.write_text('[steps.a]\nkind = "eval"\nafter = 3\n')
    assert_user_error(kdpipe("run", recipe), "after must name steps")


def test_damaged_or_crafted_metadata_is_one_line_and_overwrite_replaces_only_caches(cache, teachers, corpus,
                                                                                    tmp_path):
    store = copy_of(cache, tmp_path)
    meta = store / "logits" / "topk_ids" / "zarr.json"
    meta.write_text(meta.read_text()[:40])  # a truncated array zarr.json
    assert_user_error(kdpipe("verify", store), "logits/topk_ids")
    assert_user_error(kdpipe("inspect", store), "logits/topk_ids")

    root = json.loads((cache / "zarr.json").read_text())
    crafted = copy_of(cache, tmp_path / "c2")
    for change in ({"signals": {**root["attributes"]["kdpipe"]["signals"], "hidden_layers": "abc"}},
                   {"layout": {**root["attributes"]["kdpipe"]["layout"], "num_units": -3}},
                   {"tokenizer": {**root["attributes"]["kdpipe"]["tokenizer"], "files": {"../../x": 5}}}):
        bad = json.loads(json.dumps(root))
        bad["attributes"]["kdpipe"].update(change)
        (crafted / "zarr.json").write_text(json.dumps(bad))
        for command in (("inspect", crafted), ("verify", crafted), distill_args(crafted, tmp_path / "r")):
            assert_user_error(kdpipe(*command), "damaged kdpipe manifest")
    arr_meta = json.loads((cache / "hidden" / "layer_003" / "zarr.json").read_text())
    arr_meta["codecs"].insert(1, {"name": "numcodecs.zlib", "configuration": {"level": 1}})
    (crafted / "zarr.json").write_text(json.dumps(root))
    (crafted / "hidden" / "layer_003" / "zarr.json").write_text(json.dumps(arr_meta))
    assert_user_error(kdpipe("inspect", crafted), "codec 'numcodecs.zlib' is not one kdpipe writes")

    (store / "zarr.json").write_text('{"zarr_format": 3, "node_')  # a truncated top-level zarr.json
    assert_user_error(kdpipe("inspect", store), "damaged zarr metadata", "--overwrite")
    assert_user_error(kdpipe(*extract_args(teachers["llama"], corpus, store, "--resume")), "damaged")
    replaced = kdpipe(*extract_args(teachers["llama"], corpus, store, "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    assert kdpipe("verify", store).exit_code == 0

    other = tmp_path / "someone_elses.zarr"
    zarr.open_group(str(other), mode="w").create_array("tokens", shape=(3,), dtype="int32")
    assert_user_error(kdpipe(*extract_args(teachers["llama"], corpus, other, "--overwrite")), "not a kdpipe cache")
    assert (other / "tokens" / "zarr.json").exists()


def test_disk_full_during_distill_is_one_line_and_leaves_no_temporary_files(cache, tmp_path):
    with small_disk(tmp_path, "400k") as (disk, resize):
        args = [str(a) for a in distill_args(cache, disk / "run", "--steps", "6", "--save-every", "1")]
        proc = subprocess.run([sys.executable, "-m", "kdpipe.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("kdpipe: error: no space left on device"), proc.stderr[-2000:]
        assert "--resume" in lines[0]
        leftovers = [p for p in (disk / "run").rglob("*") if ".tmp" in p.name]
        assert not leftovers, leftovers
        resize("40m")
        resumed = subprocess.run([sys.executable, "-m", "kdpipe.cli", *args, "--resume"], capture_output=True,
                                 text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        final = json.loads((disk / "run" / "final.json").read_text())
        assert final["complete"] and final["steps"] == 6 and final["initial"]
