"""Stage 1 at scale: the DeepSpeed ZeRO-3 engine (cpu and nvme offload), several ranks, SIGKILL and resume,
a full disk. Each run is a real `kdpipe` process."""

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import zarr

from kdpipe.errors import UserError
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.writer import CRASH_ENV
from tiny import save_teacher, side_by_side, small_disk

SIGNALS = ["--seq-len", "32", "--top-k", "8", "--temperatures", "1,2", "--sample-count", "4", "--hidden-layers",
           "all", "--attention-layers", "all", "--interchange", "all", "--sequences-per-unit", "4", "--quiet"]


def env(**extra: str) -> dict:
    out = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out | extra


def kdpipe_extract(teacher: Path, corpus: Path, out: Path, *extra: str, launcher=(), **env_extra):
    cmd = [*(launcher or [sys.executable]), "-m", "kdpipe.cli", "extract", "--teacher", str(teacher),
           "--data", str(corpus), "--out", str(out), *SIGNALS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**env_extra), timeout=600)


def kill_then_resume(root: Path, teacher: Path, corpus: Path, crashes: list[str], *extra: str) -> dict:
    """Each crash ("UNIT:mid|after") killed with SIGKILL there, what its store then reads as, and its resume:
    {crash: (killed, (progress, complete, the error a complete read raises), resumed, store)}."""
    outs = {crash: root / crash.replace(":", "-") for crash in crashes}
    killed = side_by_side({c: partial(kdpipe_extract, teacher, corpus, out, *extra, **{CRASH_ENV: c})
                           for c, out in outs.items()})

    def state_of(out: Path) -> tuple:
        cache = TeacherCache(out, allow_partial=True)
        try:
            TeacherCache(out)
            error = ""
        except UserError as e:
            error = str(e)
        return cache.progress(), cache.manifest.complete, error

    seen = {crash: state_of(out) for crash, out in outs.items()}
    resumed = side_by_side({c: partial(kdpipe_extract, teacher, corpus, out, *extra, "--resume")
                            for c, out in outs.items()})
    return {crash: (killed[crash], seen[crash], resumed[crash], outs[crash]) for crash in crashes}


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {f"{g}/{name}": np.asarray(arr[:]) for g, sub in group.groups() for name, arr in sub.arrays()}


def assert_same_store(a: Path, b: Path) -> None:
    x, y = arrays_of(a), arrays_of(b)
    assert x.keys() == y.keys()
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.fixture(scope="module")
def baseline(teachers, corpus, tmp_path_factory) -> Path:
    """One rank, hf engine, uninterrupted."""
    out = tmp_path_factory.mktemp("baseline") / "cache"
    proc = kdpipe_extract(teachers["llama"], corpus, out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("engine,launcher", [("hf", "torchrun"), ("deepspeed", "torchrun"), ("deepspeed", "deepspeed")])
def test_two_ranks_equal_one_rank(engine, launcher, baseline, teachers, corpus, tmp_path):
    out = tmp_path / "cache"
    port = str(29500 + os.getpid() % 2000)
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port,
               "--no_local_rank", "--module"]
        cmd = [*cmd, "kdpipe.cli"]
    if launcher == "deepspeed":
        proc = subprocess.run([*cmd, "extract", "--teacher", str(teachers["llama"]), "--data", str(corpus),
                               "--out", str(out), *SIGNALS, "--engine", engine], capture_output=True, text=True,
                              env=env(), timeout=600)
    else:
        proc = kdpipe_extract(teachers["llama"], corpus, out, "--engine", engine, launcher=cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = TeacherCache(out).manifest
    assert manifest.complete and manifest.engine.world_size == 2 and manifest.engine.name == engine
    assert_same_store(out, baseline)


BUDGET = ["--signal-budget", "80"]  # int8, hidden states projected to 16 of 32 dims, 1 of every 4 sequences


@pytest.fixture(scope="module")
def budget_baseline(teachers, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("budget") / "cache"
    proc = kdpipe_extract(teachers["llama"], corpus, out, *BUDGET)
    assert proc.returncode == 0, proc.stderr
    m = TeacherCache(out).manifest
    assert (m.signals.hidden_rank, m.signals.signal_sequences, m.signals.attention_codec) == (16, 1, "int8")
    return out


def test_two_ranks_with_a_signal_budget_equal_one_rank(budget_baseline, teachers, corpus, tmp_path):
    """The codes are fitted once, on rank 0, and every rank encodes with the stored ones (DIITO's interventions
    included: the calibration batches are unit 0's, held for its counterfactual run)."""
    port = str(29500 + (os.getpid() + 7) % 2000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    proc = kdpipe_extract(teachers["llama"], corpus, tmp_path / "cache", "--engine", "deepspeed", *BUDGET,
                          launcher=cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_store(tmp_path / "cache", budget_baseline)


def test_two_ranks_at_some_positions_of_every_sequence_equal_one_rank(teachers, corpus, tmp_path):
    """The positions are a function of (seed, unit, lengths): each rank draws its own units' the same; the
    projected attention's codes are rank 0's, shared."""
    flags = ["--hidden-rank", "16", "--attention-rank", "4", "--position-fraction", "0.25", "--position-spans", "2"]
    one = kdpipe_extract(teachers["llama"], corpus, tmp_path / "one", *flags)
    assert one.returncode == 0, one.stderr[-3000:]
    assert TeacherCache(tmp_path / "one").manifest.position_subsampled
    port = str(29500 + (os.getpid() + 11) % 2000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    two = kdpipe_extract(teachers["llama"], corpus, tmp_path / "two", "--engine", "deepspeed", *flags, launcher=cmd)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert_same_store(tmp_path / "two", tmp_path / "one")


BUDGET_CRASHES = ["0:mid", "4:after"]


@pytest.fixture(scope="module")
def budget_crashed(teachers, corpus, tmp_path_factory) -> dict:
    return kill_then_resume(tmp_path_factory.mktemp("budget_crashed"), teachers["llama"], corpus, BUDGET_CRASHES,
                            *BUDGET)


@pytest.mark.parametrize("crash", BUDGET_CRASHES)
def test_sigkill_with_a_signal_budget_then_resume_equals_uninterrupted(crash, budget_crashed, budget_baseline):
    killed, _, resumed, out = budget_crashed[crash]
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_store(out, budget_baseline)


def test_deepspeed_cpu_offload_matches_hf(baseline, teachers, corpus, tmp_path):
    proc = kdpipe_extract(teachers["llama"], corpus, tmp_path / "c", "--engine", "deepspeed", "--offload", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    engine = TeacherCache(tmp_path / "c").manifest.engine
    assert (engine.name, engine.zero_stage, engine.offload) == ("deepspeed", 3, "cpu")
    assert_same_store(tmp_path / "c", baseline)  # fp32 ZeRO-3 is exact: same bits as the hf engine


def test_deepspeed_nvme_offload_matches_hf(corpus, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("nvme offload needs libaio: apt-get install libaio-dev (.ci/run does)")
    # partitions under 1 MiB stay in RAM: this teacher's MLP matrices (512 x 1024 fp32 = 2 MiB) go to nvme
    teacher = save_teacher(tmp_path / "wide", "llama", layers=2, hidden=512, heads=8)
    nvme = tmp_path / "nvme"
    hf = kdpipe_extract(teacher, corpus, tmp_path / "hf")
    ds = kdpipe_extract(teacher, corpus, tmp_path / "ds", "--engine", "deepspeed", "--offload", "nvme",
                        "--nvme-path", str(nvme))
    assert hf.returncode == 0 and ds.returncode == 0, ds.stderr[-3000:]
    swapped = [p for p in nvme.rglob("*") if p.is_file() and p.stat().st_size >= 2**20]
    assert swapped, "nvme offload wrote no parameter files"
    a, b = TeacherCache(tmp_path / "ds"), TeacherCache(tmp_path / "hf")
    np.testing.assert_array_equal(a.topk()[0], b.topk()[0])
    np.testing.assert_allclose(a.topk()[1], b.topk()[1], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(a.hidden(2), b.hidden(2), rtol=1e-3, atol=1e-3)


CRASHES = ["0:mid", "3:mid", "5:after", "9:after"]


@pytest.fixture(scope="module")
def crashed(teachers, corpus, tmp_path_factory) -> dict:
    return kill_then_resume(tmp_path_factory.mktemp("crashed"), teachers["llama"], corpus, CRASHES)


@pytest.mark.parametrize("crash", CRASHES)
def test_sigkill_then_resume_equals_uninterrupted(crash, crashed, baseline):
    """Killed with SIGKILL with 0 units done, some done (one half-written), and all but one done."""
    units = TeacherCache(baseline).manifest.layout.num_units
    assert units == 11
    killed, (progress, complete, error), resumed, out = crashed[crash]
    assert killed.returncode == -9, killed.stderr[-2000:]
    unit, stage = crash.split(":")
    expected_done = int(unit) + (stage == "after")
    assert progress == (expected_done, units) and not complete
    assert "incomplete" in error, "a complete read of a killed store must refuse it"
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"wrote {44 - 4 * expected_done} sequences" in resumed.stdout
    assert TeacherCache(out).manifest.complete
    assert_same_store(out, baseline)


def test_full_disk_is_one_line_and_resumable(baseline, teachers, corpus, tmp_path):
    with small_disk(tmp_path, "480k") as (disk, resize):
        out = disk / "cache"
        full = kdpipe_extract(teachers["llama"], corpus, out)
        again = kdpipe_extract(teachers["llama"], corpus, out, "--resume")  # onto a disk that is still full
        for proc in (full, again):
            assert proc.returncode == 2, proc.stderr[-2000:]
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1, proc.stderr[-3000:]
            assert lines[0].startswith("kdpipe: error: no space left on device") and "--resume" in lines[0]
        done, total = TeacherCache(out, allow_partial=True).progress()
        assert 0 < done < total and not TeacherCache(out, allow_partial=True).manifest.complete
        resize("20m")
        resumed = kdpipe_extract(teachers["llama"], corpus, out, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert_same_store(out, baseline)


def test_user_deepspeed_json_is_merged_under_kdpipe_settings(tmp_path):
    import json

    from kdpipe.stage1_extract.engines import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"offload_param": {"buffer_count": 7}}, "bf16": {"enabled": False},
                                "wall_clock_breakdown": True}))
    cfg = deepspeed_config("bfloat16", "nvme", str(tmp_path / "nv"), str(user), largest_param=3 * 10**8)
    param = cfg["zero_optimization"]["offload_param"]
    assert cfg["zero_optimization"]["stage"] == 3 and param["device"] == "nvme"
    assert param["buffer_count"] == 7, "the user's setting wins"
    assert param["buffer_size"] == 3 * 10**8, "a swap buffer must hold the largest parameter"
    assert param["nvme_path"] == str(tmp_path / "nv") and (tmp_path / "nv").is_dir()
    assert cfg["bf16"] == {"enabled": False} and cfg["wall_clock_breakdown"] is True
    assert deepspeed_config("float32", "cpu", None, None, 10)["zero_optimization"]["offload_param"]["device"] == "cpu"

    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(UserError, match="ZeRO stage 3 inference.*stage 2"):
        deepspeed_config("float32", "cpu", None, str(user), 10)
    user.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        deepspeed_config("float32", "cpu", None, str(user), 10)
    with pytest.raises(UserError, match="--nvme-path"):
        deepspeed_config("float32", "nvme", None, None, 10)
