"""Stage 2 end to end: students trained from a tiny teacher's cache alone."""

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from kdpipe.errors import UserError
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.methods import Context
from kdpipe.stage2_distill.methods.annealing_kd import AnnealingKD
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from kdpipe.storage.reader import TeacherCache
from test_cli import assert_user_error, kdpipe
from tiny import save_teacher, side_by_side


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, corpus):
    """A teacher with peaked distributions, and its cache with every signal stage 2 reads."""
    root = tmp_path_factory.mktemp("sharp")
    teacher = save_teacher(root / "teacher", "llama", sharpness=30)
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(root / "cache"), seq_len=32, top_k=16,
                          temperatures=[1.0, 2.0], sample_count=8, hidden_layers="0,3", sequences_per_unit=4,
                          quiet=True))
    return teacher, root / "cache"


def run(cache: Path, out: Path, *methods: str, **kw) -> dict:
    cfg = dict(cache=[str(cache)], student="teacher:layers=2", out=str(out), method=list(methods) or ["kd"],
               steps=50, batch_size=4, lr=3e-3, eval_sequences=8, quiet=True)
    cfg.update(kw)
    result = distill(DistillConfig(**cfg))
    return {"initial": result.initial, "final": result.final}


@pytest.mark.parametrize("method", ["kd:temperature=2", "kd:estimator=renorm", "kd:estimator=sampled",
                                    "distilbert"])
def test_training_from_the_cache_lowers_kl_to_the_teacher(method, sharp, tmp_path):
    _, cache = sharp
    r = run(cache, tmp_path / "run", method)
    assert r["final"]["eval/kl_teacher"] < 0.8 * r["initial"]["eval/kl_teacher"], r
    assert r["final"]["eval/top1_agreement"] > r["initial"]["eval/top1_agreement"] + 0.1, r
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 50 and "tokens_per_s" in lines[-1]
    own = [k for k in lines[1] if k.startswith(method.split(":")[0] + "/")]
    assert own, "the method's own loss terms are logged"
    first, last = np.mean([x[own[0]] for x in lines[1:6]]), np.mean([x[own[0]] for x in lines[-5:]])
    assert last < first, "the method's own loss falls"


def test_annealing_kd_regresses_the_teacher_logits_then_learns_labels(sharp, tmp_path):
    """Within a stage of fixed Phi(T) the annealed MSE falls; phase 2 switches to hard labels. From a top-k
    cache only the k stored logits are regressed, so the KL falls less than with KD (see the issue notes)."""
    _, cache = sharp
    r = run(cache, tmp_path / "run", "annealing_kd:max_temperature=2,phase1=0.8", lr=1e-2, steps=60)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    stage2 = [x["annealing_kd/annealed_mse"] for x in lines[24:48]]  # steps 25..48: Phi = 1
    assert np.mean(stage2[-5:]) < 0.5 * np.mean(stage2[:5])
    assert all("annealing_kd/hard" in x for x in lines[48:]) and "annealing_kd/hard" not in lines[47]
    assert r["final"]["eval/kl_teacher"] < r["initial"]["eval/kl_teacher"]


def test_saved_student_reloads_with_transformers(sharp, tmp_path):
    _, cache = sharp
    r = run(cache, tmp_path / "run", steps=10)
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student").eval()
    assert student.config.num_hidden_layers == 2
    from kdpipe.stage2_distill.data import Split, eval_batches
    from kdpipe.stage2_distill.evaluate import evaluate
    from kdpipe.stage2_distill.methods.base import Needs

    tc = TeacherCache(cache)
    split = Split(**json.loads((tmp_path / "run" / "run.json").read_text())["split"])
    again = evaluate(student, eval_batches(tc, Needs(topk=True), split.eval_units, 4), torch.device("cpu"), False)
    assert again == pytest.approx(r["final"], rel=1e-5)


def test_resumed_run_continues_identically(sharp, tmp_path):
    _, cache = sharp
    run(cache, tmp_path / "straight", steps=20, save_every=10, method=("kd", "lm:weight=0.3"))
    run(cache, tmp_path / "resumed", steps=20, save_every=10, method=("kd", "lm:weight=0.3"))
    ckpts = tmp_path / "resumed" / "checkpoints"
    shutil.rmtree(ckpts / "step_0000020")  # as if it had been killed after step 10
    shutil.rmtree(tmp_path / "resumed" / "student")
    (tmp_path / "resumed" / "final.json").unlink()
    run(cache, tmp_path / "resumed", steps=20, save_every=10, method=("kd", "lm:weight=0.3"), resume=True)
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "student").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "student").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_missing_signals_name_the_extract_flags(sharp, corpus, tmp_path):
    teacher, _ = sharp
    bare = tmp_path / "bare"
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(bare), seq_len=32, top_k=8,
                          temperatures=[1.0], sequences_per_unit=4, quiet=True))
    cases = [("distilbert", r"--temperatures 1,2 \(temperature 2 is not stored; stored: 1\)"), ("distilbert:temperature=1", "--hidden-layers 3"),
             ("kd:estimator=sampled", "--sample-count"), ("kd:temperature=3", "--temperatures 1,3")]
    for method, flag in cases:
        with pytest.raises(UserError, match=f"method {method.split(':')[0]} needs.*{flag}"):
            run(bare, tmp_path / method.replace(":", "_"), method, steps=1)
    with pytest.raises(UserError, match="takd is not a loss but a recipe: kdpipe run examples/takd.toml"):
        run(bare, tmp_path / "t", "takd", steps=1)
    with pytest.raises(UserError, match="no method 'nope'"):
        run(bare, tmp_path / "t", "nope", steps=1)
    with pytest.raises(UserError, match="method tinybert needs.*--hidden-layers 0,2,3 --attention-layers 2,3 "
                                        "--attention-form factors"):
        run(bare, tmp_path / "t3", "tinybert", steps=1)
    with pytest.raises(UserError, match="method kd has no setting 'temprature'"):
        run(bare, tmp_path / "t2", "kd:temprature=2", steps=1)


def test_a_cache_from_before_the_tail_and_draw_arrays_still_trains(sharp, corpus, tmp_path):
    """Caches written before kdpipe 0.2 lack logits/logtail and sampled/logprobs: they verify and train (the tail
    recovered from the top-k), and only what needs a new array, draws at T=1 weighted for T=2, names it."""
    import zarr

    teacher, _ = sharp
    cache, old = tmp_path / "float16", tmp_path / "old"  # kdpipe 0.2 wrote float16 top-k caches only
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(cache), seq_len=32, top_k=16,
                          temperatures=[1.0, 2.0], sample_count=8, hidden_layers="0,3", sequences_per_unit=4,
                          logit_codec="float16", quiet=True))
    shutil.copytree(cache, old)
    store = zarr.open_group(str(old), mode="r+")
    raw = dict(store.attrs["kdpipe"])
    raw["signals"] = {k: v for k, v in raw["signals"].items() if k not in ("logtail", "sampled_logprobs")}
    store.attrs["kdpipe"] = raw
    shutil.rmtree(old / "logits" / "logtail")
    shutil.rmtree(old / "sampled" / "logprobs")
    assert kdpipe("verify", str(old)).exit_code == 0
    new, before = run(cache, tmp_path / "new", steps=3), run(old, tmp_path / "a", steps=3)
    assert abs(before["final"]["eval/kl_teacher"] - new["final"]["eval/kl_teacher"]) < 1e-3  # tails are not tiny here
    run(old, tmp_path / "b", "kd:estimator=sampled", steps=2)
    with pytest.raises(UserError, match=r"method kd needs.*--sample-count 8 without --no-sample-logprobs \(the cache "
                                        r"holds no log-probabilities of the drawn ids, which weight draws made at T=1 "
                                        r"for T=2"):
        run(old, tmp_path / "c", "kd:estimator=sampled,temperature=2", steps=1)


def test_an_importance_sampled_cache_trains_kd_and_names_what_needs_a_top_k(sharp, corpus, tmp_path):
    """--top-k 0 --sample-count 12: the draws, their counts and log-probabilities and the logsumexps only.
    kd:estimator=sampled trains from it (held-out KL estimated from the draws, unbiased); a method that
    needs the top-k is refused before training, naming --top-k."""
    teacher, _ = sharp
    out = tmp_path / "sampled"
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(out), seq_len=32, top_k=0,
                          sample_count=12, sequences_per_unit=4, quiet=True))
    cache = TeacherCache(out)
    names = {a for a in ("logits/topk_ids", "logits/topk_values", "logits/logtail", "sampled/logprobs")
             if (out / a / "zarr.json").exists()}
    assert names == {"sampled/logprobs"}
    assert kdpipe("verify", str(out)).exit_code == 0
    with pytest.raises(UserError, match="importance-sampled cache"):
        cache.topk_logprobs()
    r = run(out, tmp_path / "run", "kd:estimator=sampled")
    assert r["final"]["eval/kl_teacher"] < 0.8 * r["initial"]["eval/kl_teacher"], r
    assert r["final"]["eval/top1_agreement"] > r["initial"]["eval/top1_agreement"], r
    with pytest.raises(UserError, match=r"method kd \(estimator bucket\) reads top-k logits, .* use "
                                        r"kd:estimator=sampled, or re-extract with `kdpipe extract --top-k 64"):
        run(out, tmp_path / "bucket", "kd", steps=1)
    with pytest.raises(UserError, match=r"method annealing_kd needs.*--top-k 64"):  # no estimator: re-extract
        run(out, tmp_path / "annealing", "annealing_kd", steps=1)
    assert_user_error(kdpipe("extract", "--teacher", str(teacher), "--data", str(corpus), "--out",
                             str(tmp_path / "none"), "--top-k", "0"), "--top-k 0 keeps no top-k logits")


def test_kdpipe_eval_reproduces_the_run_metrics(sharp, tmp_path):
    _, cache = sharp
    r = run(cache, tmp_path / "run", steps=5, eval_sequences=12)  # 3 held-out units, not contiguous in general
    result = kdpipe("eval", tmp_path / "run" / "student", "--cache", cache, "--run", tmp_path / "run", "--json",
                    "--batch-size", "3")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["sequences"] == 12
    for key, value in r["final"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key
    everything = json.loads(kdpipe("eval", tmp_path / "run" / "student", "--cache", cache, "--json").stdout)
    assert everything["sequences"] == TeacherCache(cache).num_sequences
    five = json.loads(kdpipe("eval", tmp_path / "run" / "student", "--cache", cache, "--json", "--batch-size", "3",
                             "--max-sequences", "5").stdout)
    assert five["sequences"] == 5
    assert_user_error(kdpipe("eval", tmp_path, "--cache", cache), "not a model directory")


def test_two_students_two_methods_one_cache_no_teacher_on_disk(sharp, tmp_path):
    teacher, cache = sharp
    hidden = teacher.with_name("teacher-hidden")
    teacher.rename(hidden)
    try:
        a = run(cache, tmp_path / "a", "kd:temperature=2", student="teacher:layers=1,hidden=16")
        b = run(cache, tmp_path / "b", "distilbert", "lm:weight=0.5", student="teacher:layers=2")
    finally:
        hidden.rename(teacher)
    for r in (a, b):
        assert r["final"]["eval/kl_teacher"] < r["initial"]["eval/kl_teacher"]
    cfg_a = json.loads((tmp_path / "a" / "student" / "config.json").read_text())
    assert cfg_a["hidden_size"] == 16 and cfg_a["num_hidden_layers"] == 1


def test_pd_and_teacher_layer_initialization(sharp, tmp_path):
    teacher, cache = sharp
    with pytest.raises(UserError, match="pd distills a pre-trained student"):
        run(cache, tmp_path / "scratch", "pd", steps=1)
    r0 = run(cache, tmp_path / "init", "lm", steps=1, lr=1e-9, warmup=0, init_from_teacher=str(teacher),
             layer_map="1:1,2:3")
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "init" / "student")
    t = transformers.AutoModelForCausalLM.from_pretrained(teacher)
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, t.model.layers[2].mlp.up_proj.weight,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(student.lm_head.weight, t.lm_head.weight, rtol=1e-6, atol=1e-6)
    scratch = run(cache, tmp_path / "scratch_lm", "lm", steps=1, lr=1e-9, warmup=0)
    assert r0["initial"]["eval/kl_teacher"] < 0.3 * scratch["initial"]["eval/kl_teacher"], "close to the teacher"
    r = run(cache, tmp_path / "pd", "pd:temperature=2", student=str(tmp_path / "init" / "student"), steps=20, lr=3e-4)
    assert r["final"]["eval/kl_teacher"] < r["initial"]["eval/kl_teacher"]


def test_layer_maps_and_annealing_schedule():
    assert map_layers("uniform", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert map_layers("uniform", 4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]  # 4.5 rounds up, not to even
    assert map_layers("uniform", 4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]  # a deeper student: never embeddings
    assert map_layers("skip", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert map_layers("last", 3, 12) == [(1, 10), (2, 11), (3, 12)]
    assert map_layers("1:2,2:6", 2, 6) == [(1, 2), (2, 6)]
    with pytest.raises(UserError, match="out of range"):
        map_layers("1:9", 2, 6)
    ctx = Context(teacher=None, temperatures=[1.0], student_layers=2, student_hidden=8, total_steps=100)
    method = AnnealingKD({"max_temperature": 4, "phase1": 0.5}, ctx)
    factors = [method.annealing_factor(s) for s in range(50)]
    assert factors[0] == pytest.approx(1 / 4) and factors[-1] == pytest.approx(1.0)
    assert sorted(set(factors)) == pytest.approx([0.25, 0.5, 0.75, 1.0]) and factors == sorted(factors)


def test_distill_cli_and_user_errors(sharp, tmp_path):
    teacher, cache = sharp
    result = kdpipe("distill", "--cache", cache, "--student", "teacher:layers=1", "--method", "kd:temperature=2",
                    "--out", tmp_path / "run", "--steps", "3", "--batch-size", "4", "--eval-sequences", "8", "--quiet")
    assert result.exit_code == 0, result.output
    assert "held-out" in result.stdout and (tmp_path / "run" / "student" / "config.json").exists()
    assert_user_error(kdpipe("distill", "--cache", cache, "--student", "teacher:layers=1", "--out", tmp_path / "run",
                             "--quiet"), "already holds a run", "--resume")
    assert_user_error(kdpipe("distill", "--cache", tmp_path / "nope", "--student", "teacher", "--out", tmp_path / "x"),
                      "no teacher cache")
    other_vocab = tmp_path / "other.json"
    other_vocab.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 500, "n_embd": 16, "n_layer": 1,
                                       "n_head": 2}))
    assert_user_error(kdpipe("distill", "--cache", cache, "--student", other_vocab, "--out", tmp_path / "y"),
                      "vocabulary has 500 entries but the teacher's has")
    assert_user_error(kdpipe("distill", "--cache", cache, "--student", "teacher:depth=2", "--out", tmp_path / "z"),
                      "unknown student preset key 'depth'")
    config = tmp_path / "distill.toml"
    config.write_text(f'[distill]\ncache = "{cache}"\nstudent = "teacher:layers=1"\nmethod = ["kd:temperature=2", '
                      f'"lm:weight=0.5"]\nsteps = 2\nbatch-size = 4\neval-sequences = 8\nquiet = true\n')
    from_file = kdpipe("distill", "--config", config, "--out", tmp_path / "from_toml", "--steps", "3")
    assert from_file.exit_code == 0, from_file.output
    lines = (tmp_path / "from_toml" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3 and "lm/lm" in json.loads(lines[-1])
    listed = kdpipe("methods", "--json")
    rows = json.loads(listed.stdout)
    assert len([r for r in rows if r["method"] != "lm"]) == 25
    assert {r["method"] for r in rows if r["status"].startswith("cache")} >= {"kd", "pd", "distilbert", "annealing_kd",
                                                                              "tinybert", "minilmv2"}
    assert next(r for r in rows if r["method"] == "pkd")["status"] == "cache (adapted)"
    assert next(r for r in rows if r["method"] == "takd")["status"] == "recipe"


LAYER_METHODS = ["tinybert", "minilm", "minilmv2", "mobilebert", "pkd", "sid", "alp_kd", "ckd", "universal_kd",
                 "rail_kd", "mgskd", "lrc_bert", "theseus", "diito"]


@pytest.fixture(scope="module")
def every_signal(tmp_path_factory, corpus):
    """A cache with every signal the intermediate-layer methods read (interchange interventions included)."""
    root = tmp_path_factory.mktemp("every")
    teacher = save_teacher(root / "teacher", "llama", sharpness=30)
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(root / "cache"), seq_len=32, top_k=16,
                          hidden_layers="all", attention_layers="all", attention_form="factors",
                          interchange_layers="all", sequences_per_unit=4, quiet=True))
    return root / "cache"


def test_zero_student_training_matches_plain_training(every_signal, tmp_path):
    """--deepspeed with ZeRO stage 2, stage 3, and ZeRO-Offload of the optimizer (CPU, gloo) trains the same
    student as plain AdamW with all 14 intermediate-layer methods at once: their projections, heads and maps
    are parameters DeepSpeed must partition and update too. A ZeRO run resumes from its own checkpoint."""
    methods = [f"{m}:weight=0.1" for m in LAYER_METHODS] + ["kd:temperature=2"]
    args = ["--cache", str(every_signal), "--student", "teacher:layers=2,hidden=16", "--steps", "6", "--batch-size",
            "4", "--eval-sequences", "8", "--save-every", "3", "--quiet", *[x for m in methods for x in ("--method", m)]]
    # one thread each: the four runs go side by side (each is mostly its start-up), and every run the same
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")} | {"OMP_NUM_THREADS": "1"}

    def distill_cli(out, *extra):
        proc = subprocess.run([sys.executable, "-m", "kdpipe.cli", "distill", *args, "--out", str(out), *extra],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "final.json").read_text())["final"]

    configs = {"zero2": {"stage": 2}, "zero3": {"stage": 3}, "offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    for name, zero in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"zero_optimization": zero}))
    finals = side_by_side({"plain": partial(distill_cli, tmp_path / "plain")} |
                          {name: partial(distill_cli, tmp_path / name, "--deepspeed", str(tmp_path / f"{name}.json"))
                           for name in configs})
    for name in configs:
        assert finals[name] == pytest.approx(finals["plain"], rel=1e-4), name
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "student")
        assert reloaded.config.num_hidden_layers == 2
    # resume under ZeRO from the step-3 checkpoint reaches the same student
    run = tmp_path / "zero3"
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    shutil.rmtree(run / "student")
    (run / "final.json").unlink()
    distill_cli(run, "--deepspeed", str(tmp_path / "zero3.json"), "--resume")
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "student").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(run / "student").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
