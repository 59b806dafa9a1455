"""The CLI: a cache round-trips through inspect and verify; every mistake a user can make is one line, exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdpipe.cli import cli


def kdpipe(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def extract_args(teacher: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--teacher", teacher, "--data", corpus, "--out", out, "--seq-len", "32", "--top-k", "8",
            "--sequences-per-unit", "8", "--quiet", *extra]


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdpipe: error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_extract_inspect_verify_round_trip(teachers, corpus, tmp_path):
    out = tmp_path / "cache"
    result = kdpipe(*extract_args(teachers["llama"], corpus, out, "--hidden-layers", "uniform:2",
                                  "--attention-layers", "last:1", "--sample-count", "4"))
    assert result.exit_code == 0, result.output
    assert "cache complete" in result.stdout

    shown = kdpipe("inspect", out, "--json")
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)
    names = {a["name"] for a in summary["arrays"]}
    assert {"logits/topk_ids", "sampled/counts", "hidden/layer_002", "hidden/layer_003",
            "attention/layer_003_q"} <= names
    assert summary["units_done"] == summary["units_total"] > 0
    on_disk = sum(f.stat().st_size for f in (out / "logits" / "topk_values").rglob("*") if f.is_file())
    assert next(a for a in summary["arrays"] if a["name"] == "logits/topk_values")["stored_bytes"] == on_disk
    assert "work units" in kdpipe("inspect", out).stdout

    checked = kdpipe("verify", out)
    assert checked.exit_code == 0 and "verified" in checked.stdout


def test_config_file_supplies_flags_and_flags_win(teachers, corpus, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[extract]\nteacher = "{teachers["gpt2"]}"\ndata = ["{corpus}"]\nseq-len = 16\n'
                      f'top_k = 4\ntemperatures = [1, 3]\nquiet = true\n')
    out = tmp_path / "cache"
    result = kdpipe("extract", "--config", config, "--out", out, "--top-k", "6")
    assert result.exit_code == 0, result.output
    manifest = json.loads(kdpipe("inspect", out, "--json").stdout)["manifest"]
    assert manifest["data"]["seq_len"] == 16 and manifest["signals"]["top_k"] == 6
    assert manifest["signals"]["temperatures"] == [1.0, 3.0]

    config.write_text('[extract]\ntop_kk = 4\n')
    assert_user_error(kdpipe("extract", "--config", config, "--out", out), "unknown setting 'top_kk'")


def test_bad_inputs_are_one_line_and_exit_2(teachers, corpus, tmp_path):
    llama = teachers["llama"]
    assert_user_error(kdpipe(*extract_args(tmp_path / "nope", corpus, tmp_path / "o")), "does not exist")
    not_model = tmp_path / "not_model"
    not_model.mkdir()
    (not_model / "weights.txt").write_text("x")
    assert_user_error(kdpipe(*extract_args(not_model, corpus, tmp_path / "o")), "not a model directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert_user_error(kdpipe(*extract_args(llama, empty, tmp_path / "o")), "fewer than 32 tokens")
    assert_user_error(kdpipe(*extract_args(llama, tmp_path / "missing", tmp_path / "o")), "matches nothing")
    assert_user_error(kdpipe(*extract_args(llama, corpus, tmp_path / "o"), "--seq-len", "4096"),
                      "longer than the teacher's 128 positions")
    assert_user_error(kdpipe(*extract_args(llama, corpus, tmp_path / "o"), "--top-k", "100000"),
                      "larger than the vocabulary")
    assert_user_error(kdpipe(*extract_args(llama, corpus, tmp_path / "o"), "--hidden-layers", "0,7"),
                      "hidden layer 7 is out of range", "0..3")
    assert_user_error(kdpipe(*extract_args(llama, corpus, tmp_path / "o"), "--attention-layers", "0"),
                      "attention layer 0 is out of range", "1..3")
    assert_user_error(kdpipe(*extract_args(llama, corpus, tmp_path / "o"), "--hidden-layers", "middle"),
                      "bad hidden layer list")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.tex").write_text("precious")
    assert_user_error(kdpipe(*extract_args(llama, corpus, occupied)), "not a kdpipe cache")
    assert_user_error(kdpipe(*extract_args(llama, corpus, occupied), "--overwrite"), "not a kdpipe cache")
    assert (occupied / "thesis.tex").read_text() == "precious"
    assert_user_error(kdpipe("inspect", occupied), "not a kdpipe teacher cache")
    assert_user_error(kdpipe("inspect", tmp_path / "absent"), "no teacher cache")
    assert not (tmp_path / "o").exists(), "a failed run must not leave a store behind"


def test_existing_cache_needs_resume_or_overwrite(teachers, corpus, tmp_path):
    out = tmp_path / "cache"
    assert kdpipe(*extract_args(teachers["llama"], corpus, out)).exit_code == 0
    assert_user_error(kdpipe(*extract_args(teachers["llama"], corpus, out, "--top-k", "4")),
                      "already holds a complete kdpipe cache", "--resume", "--overwrite")
    assert_user_error(kdpipe(*extract_args(teachers["llama"], corpus, out, "--top-k", "4", "--resume")),
                      "different configuration", "signals")
    again = kdpipe(*extract_args(teachers["llama"], corpus, out, "--resume"))
    assert again.exit_code == 0 and "wrote 0 sequences" in again.stdout
    replaced = kdpipe(*extract_args(teachers["llama"], corpus, out, "--top-k", "4", "--overwrite"))
    assert replaced.exit_code == 0
    assert json.loads(kdpipe("inspect", out, "--json").stdout)["manifest"]["signals"]["top_k"] == 4


def test_a_multinomial_sampled_cache_resumes_only_with_its_sampler_and_a_top_k_cache_with_either(teachers, corpus,
                                                                                                   tmp_path):
    """The default sampler changed to systematic: an older sampled cache's resume names the flag that continues
    it; a cache without draws resumes whatever --sampler says (no draws, nothing differs)."""
    out, draws = tmp_path / "sampled", ("--sample-count", "4", "--max-sequences", "16")
    assert kdpipe(*extract_args(teachers["llama"], corpus, out, *draws, "--sampler", "multinomial")).exit_code == 0
    assert_user_error(kdpipe(*extract_args(teachers["llama"], corpus, out, *draws, "--resume")),
                      "signals.sampler", "--sampler multinomial")
    again = kdpipe(*extract_args(teachers["llama"], corpus, out, *draws, "--sampler", "multinomial", "--resume"))
    assert again.exit_code == 0 and "wrote 0 sequences" in again.stdout
    plain = tmp_path / "plain"
    assert kdpipe(*extract_args(teachers["llama"], corpus, plain, "--sampler", "multinomial",
                                "--max-sequences", "16")).exit_code == 0
    assert kdpipe(*extract_args(teachers["llama"], corpus, plain, "--max-sequences", "16", "--resume")).exit_code == 0


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, not only click's test runner."""
    proc = subprocess.run([sys.executable, "-m", "kdpipe.cli", "extract", "--teacher", str(tmp_path / "x"),
                           "--data", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("kdpipe: error: teacher")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("spec,want", [("all", [0, 1, 2, 3]), ("uniform:2", [2, 3]), ("last:2", [2, 3]),
                                       ("none", []), ("0, 3", [0, 3])])
def test_layer_specs(spec, want):
    from kdpipe.capture import parse_layers

    assert parse_layers(spec, 3, 0, "hidden") == want
