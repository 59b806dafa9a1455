"""`kdpipe run`: the shipped TAKD recipe end to end on tiny models; a second run skips every step; a
changed setting reruns that step and those below it; one step can be rerun alone; mistakes are one line."""

import json
from pathlib import Path

import pytest

from test_cli import kdpipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def takd(teachers, corpus, workdir, *extra):
    return kdpipe("run", EXAMPLES / "takd.toml", "--workdir", workdir, "--var", f"teacher={teachers['llama']}",
                  "--var", f"data={corpus}", "--var", "seq_len=32", "--var", "sequences=24", "--var", "steps=4",
                  "--var", "assistant=teacher:layers=2,hidden=32", "--var", "student=teacher:layers=1,hidden=16", *extra)


def statuses(output: str) -> dict[str, str]:
    rows = [line.split() for line in output.splitlines() if line.split()[:1] and line.split()[0] in
            ("teacher_cache", "assistant", "assistant_cache", "student", "student_vs_teacher")]
    return {r[0]: r[2] for r in rows}


def test_takd_recipe_runs_then_skips_then_reruns_what_changed(teachers, corpus, tmp_path):
    first = takd(teachers, corpus, tmp_path)
    assert first.exit_code == 0, first.output
    assert statuses(first.stdout) == dict.fromkeys(
        ["teacher_cache", "assistant", "assistant_cache", "student", "student_vs_teacher"], "ran")
    outputs = {p.name.rsplit("-", 1)[0]: p for p in tmp_path.iterdir()}
    # the assistant, extracted in turn, is a teacher: its cache names the assistant's student directory
    manifest = json.loads((outputs["assistant_cache"] / "zarr.json").read_text())["attributes"]["kdpipe"]
    assert manifest["teacher"]["num_layers"] == 2 and manifest["complete"]
    assert json.loads((outputs["student_vs_teacher"] / "eval.json").read_text())["eval/kl_teacher"] > 0

    second = takd(teachers, corpus, tmp_path)
    assert second.exit_code == 0 and set(statuses(second.stdout).values()) == {"skipped"}, second.output

    changed = takd(teachers, corpus, tmp_path, "--var", "student=teacher:layers=1,hidden=32")
    assert statuses(changed.stdout) == {"teacher_cache": "skipped", "assistant": "skipped",
                                        "assistant_cache": "skipped", "student": "ran", "student_vs_teacher": "ran"}

    alone = takd(teachers, corpus, tmp_path, "--only", "assistant", "--force")
    assert alone.exit_code == 0 and statuses(alone.stdout) == {"assistant": "ran"}, alone.output


def test_recipe_mistakes_are_one_line(teachers, corpus, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[steps.a]\nkind = "extract"\nteacher = "x"\nwrong_key = 1\n')
    result = kdpipe("run", bad, "--workdir", tmp_path / "w")
    assert result.exit_code == 2 and "recipe step 'a': unknown setting 'wrong_key' for `kdpipe extract`" in result.stderr
    bad.write_text('[steps.a]\nkind = "distill"\ncache = ["${b}"]\n[steps.b]\nkind = "extract"\ndata = ["${a}"]\n')
    result = kdpipe("run", bad)
    assert result.exit_code == 2 and "cycle" in result.stderr
    bad.write_text('[steps.a]\nkind = "train"\n')
    assert "needs kind = one of extract, distill, eval" in kdpipe("run", bad).stderr
    result = takd(teachers, corpus, tmp_path, "--only", "student")
    assert result.exit_code == 2 and "needs 'teacher_cache', which is not done" in result.stderr


@pytest.mark.parametrize("recipe,teacher_var,extra", [("dgkd", "teacher", []), ("multi_teacher", "teacher_a", []),
                                                      ("sweep", "teacher", ["--var", "hidden=0,1,2,3"])])
def test_shipped_recipes_run_on_tiny_models(recipe, teacher_var, extra, teachers, corpus, tmp_path):
    result = kdpipe("run", EXAMPLES / f"{recipe}.toml", "--workdir", tmp_path, "--var",
                    f"{teacher_var}={teachers['llama']}", "--var", f"data={corpus}", "--var", "seq_len=32",
                    "--var", "sequences=32", "--var", "steps=2", *extra)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("step "))
    table = [line.split() for line in lines[header + 1:]]
    assert table and all(row[2] == "ran" for row in table)
    assert all(len(row) >= 7 for row in table if row[1] == "distill")  # CE, KL and agreement for every student


def test_the_chat_recipe_runs_on_a_tiny_chat_teacher(tmp_path):
    from test_chat import write_chats
    from tiny import make_chat_tokenizer, save_teacher
    teacher = save_teacher(tmp_path / "teacher", "llama")
    make_chat_tokenizer().save_pretrained(teacher)
    data = write_chats(tmp_path / "chats.jsonl")
    result = kdpipe("run", EXAMPLES / "chat.toml", "--workdir", tmp_path / "w", "--var", f"teacher={teacher}",
                    "--var", f"data={data}", "--var", "seq_len=48", "--var", "steps=2",
                    "--var", "student=teacher:layers=1,hidden=16")
    assert result.exit_code == 0, result.output
    (cache,) = (tmp_path / "w").glob("teacher_cache-*")
    from kdpipe.pipeline.recipe import MARKER
    from kdpipe.storage.reader import TeacherCache
    assert TeacherCache(cache).manifest.data.loss_mask == "assistant"
    markers = list((tmp_path / "w").glob(f"*/{MARKER}"))
    assert len(markers) == 4 and all(json.loads(p.read_text())["record"] for p in markers)  # every step ran
