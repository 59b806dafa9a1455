"""Every mistake a user can make ends in one line naming the fix, exit code 2, no traceback, and leaves
everything that existed before untouched. Each is driven through the CLI."""

import hashlib
import json
from pathlib import Path

import pytest

from test_cli import assert_user_error, extract_args, kdpipe


@pytest.fixture(scope="module")
def world(teachers, corpus, tmp_path_factory) -> dict[str, Path]:
    """A cache, a finished run, and the odd files a user has lying around."""
    root = tmp_path_factory.mktemp("mistakes")
    cache = root / "cache"
    assert kdpipe(*extract_args(teachers["llama"], corpus, cache, "--hidden-layers", "3")).exit_code == 0
    run = root / "run"
    assert kdpipe("distill", "--cache", cache, "--student", "teacher:layers=1", "--out", run, "--steps", "2",
                  "--batch-size", "4", "--eval-sequences", "8", "--quiet").exit_code == 0
    (root / "afile").write_text("not a directory")
    (root / "garbage").mkdir()
    (root / "garbage" / "zarr.json").write_text("{ not json")
    (root / "thesis").mkdir()
    (root / "thesis" / "thesis.tex").write_text("precious")
    (root / "nothing_readable").mkdir()
    (root / "nothing_readable" / "data.csv").write_text("a,b\n1,2\n")
    (root / "numbers.jsonl").write_text('{"text": 12}\n')
    (root / "broken.jsonl").write_text('{"text": "ok"\n')
    bad_model = root / "corrupt_model"
    bad_model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad_model / name).write_bytes((teachers["llama"] / name).read_bytes())
    (bad_model / "model.safetensors").write_bytes((teachers["llama"] / "model.safetensors").read_bytes()[:300])
    (root / "unknown.toml").write_text("[extract]\nno_such_flag = 1\n")
    (root / "vars.toml").write_text('vars = "x"\n[steps.a]\nkind = "eval"\n')
    (root / "other_vocab.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 500, "n_embd": 16,
                                                       "n_layer": 1, "n_head": 2}))
    return {"root": root, "cache": cache, "run": run, "teacher": teachers["llama"], "corpus": corpus}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def ex(w, *extra, out=None, teacher=None, data=None):
    return extract_args(teacher or w["teacher"], data or w["corpus"], out or w["root"] / "new_cache", *extra)


def di(w, *extra, out=None, cache=None):
    return ["distill", "--cache", cache or w["cache"], "--student", "teacher:layers=1", "--out",
            out or w["root"] / "new_run", "--steps", "2", "--batch-size", "4", "--quiet", *extra]


MISTAKES = [
    # extract: paths
    ("teacher missing", lambda w: ex(w, teacher=w["root"] / "nope"), "does not exist"),
    ("teacher not a model", lambda w: ex(w, teacher=w["root"] / "thesis"), "not a model directory"),
    ("teacher weights corrupt", lambda w: ex(w, teacher=w["root"] / "corrupt_model"), "cannot load the model"),
    ("data missing", lambda w: ex(w, data=w["root"] / "nope"), "matches nothing"),
    ("data unreadable", lambda w: ex(w, data=w["root"] / "nothing_readable"), "no corpus files"),
    ("jsonl text not a string", lambda w: ex(w, data=w["root"] / "numbers.jsonl"), "not text"),
    ("jsonl not json", lambda w: ex(w, data=w["root"] / "broken.jsonl"), "not valid JSON"),
    ("out is a file", lambda w: ex(w, out=w["root"] / "afile"), "is a file"),
    ("out below a file", lambda w: ex(w, out=w["root"] / "afile" / "sub"), "is a file"),
    ("out over garbage zarr.json", lambda w: ex(w, out=w["root"] / "garbage"), "damaged zarr metadata"),
    ("out over other data", lambda w: ex(w, "--overwrite", out=w["root"] / "thesis"), "not a kdpipe cache"),
    ("out holds a cache", lambda w: ex(w, "--hidden-layers", "3", out=w["cache"]), "--resume"),
    ("resume other settings", lambda w: ex(w, "--resume", out=w["cache"]), "different configuration"),
    ("resume and overwrite", lambda w: ex(w, "--resume", "--overwrite", out=w["cache"]), "exclude each other"),
    # extract: flags
    ("seq-len too long", lambda w: ex(w, "--seq-len", "4096"), "longer than the teacher's"),
    ("top-k too large", lambda w: ex(w, "--top-k", "100000"), "larger than the vocabulary"),
    ("hidden layer out of range", lambda w: ex(w, "--hidden-layers", "9"), "out of range"),
    ("logit rows 0", lambda w: ex(w, "--logit-rows", "0"), "--logit-rows must be positive"),
    ("device unknown", lambda w: ex(w, "--device", "quantum"), "is not a device"),
    ("max sequences 0", lambda w: ex(w, "--max-sequences", "0"), "--max-sequences must be positive"),
    ("temperatures not numbers", lambda w: ex(w, "--temperatures", "abc"), "must be a number"),
    ("chunk does not divide unit", lambda w: ex(w, "--sequences-per-chunk", "3"), "must divide"),
    ("interchange rate 0", lambda w: ex(w, "--interchange-rate", "0"), "--interchange-rate"),
    ("nvme path without nvme", lambda w: ex(w, "--nvme-path", "/tmp/x"), "--offload nvme"),
    ("config missing", lambda w: ["extract", "--config", w["root"] / "none.toml", "--out", "x"], "does not exist"),
    ("config unknown key", lambda w: ["extract", "--config", w["root"] / "unknown.toml"], "unknown setting"),
    # distill
    ("method setting not a number", lambda w: di(w, "--method", "kd:temperature=abc"), "must be a number"),
    ("method weight negative", lambda w: di(w, "--method", "kd:weight=-1"), "0 or more"),
    ("method temperature 0", lambda w: di(w, "--method", "kd:temperature=0"), "must be positive"),
    ("method unknown", lambda w: di(w, "--method", "nope"), "no method 'nope'"),
    ("method estimator unknown", lambda w: di(w, "--method", "kd:estimator=magic"), "is not one of"),
    ("method setting unknown", lambda w: di(w, "--method", "kd:temprature=2"), "has no setting 'temprature'"),
    ("lr negative", lambda w: di(w, "--lr", "-1"), "--lr must be a positive number"),
    ("eval sequences negative", lambda w: di(w, "--eval-sequences", "-1"), "--eval-sequences"),
    ("layer map garbage", lambda w: di(w, "--layer-map", "sideways"), "--layer-map"),
    ("distill out below a file", lambda w: di(w, out=w["root"] / "afile" / "sub"), "is a file"),
    ("distill out over other data", lambda w: di(w, "--overwrite", out=w["root"] / "thesis"),
     "not part of a kdpipe run"),
    ("run exists", lambda w: di(w, out=w["run"]), "already holds a run"),
    ("cache missing", lambda w: di(w, cache=w["root"] / "nope"), "no teacher cache"),
    ("cache is not a cache", lambda w: di(w, cache=w["root"] / "thesis"), "not a kdpipe teacher cache"),
    ("distill device unknown", lambda w: di(w, "--device", "quantum"), "is not a device"),
    ("student preset key", lambda w: ["distill", "--cache", w["cache"], "--student", "teacher:depth=2", "--out",
                                      w["root"] / "r2"], "unknown student preset key"),
    ("student other vocabulary", lambda w: ["distill", "--cache", w["cache"], "--student", w["root"] / "other_vocab.json",
                                            "--out", w["root"] / "r3"], "vocabulary has 500"),
    # eval, plan, recipes, inspect, verify
    ("eval corrupt model", lambda w: ["eval", w["root"] / "corrupt_model", "--cache", w["cache"]], "cannot load the model"),
    ("eval not a run", lambda w: ["eval", w["run"] / "student", "--cache", w["cache"], "--run", w["root"] / "thesis"],
     "not a kdpipe distill run"),
    ("plan tokens not a number", lambda w: ["plan", "--teacher", "llama-7b", "--tokens", "abc"], "cannot read the size"),
    ("plan zero gpus", lambda w: ["plan", "--teacher", "llama-7b", "--gpus", "0"], "--gpus must be at least 1"),
    ("plan unknown teacher", lambda w: ["plan", "--teacher", "gpt-5"], "not a config.json"),
    ("recipe vars not a table", lambda w: ["run", w["root"] / "vars.toml"], "must be tables"),
    ("inspect a directory", lambda w: ["inspect", w["root"] / "thesis"], "not a kdpipe teacher cache"),
    ("verify a file", lambda w: ["verify", w["root"] / "afile"], "not a kdpipe teacher cache"),
]


@pytest.mark.parametrize("name,args,needle", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_and_changes_nothing(name, args, needle, world):
    before = snapshot(world["root"])
    assert_user_error(kdpipe(*args(world)), needle)
    after = snapshot(world["root"])
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:4]
    assert not (world["root"] / "new_cache").exists() and not (world["root"] / "new_run").exists()


def test_there_are_at_least_thirty():
    assert len(MISTAKES) >= 30
