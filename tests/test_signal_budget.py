"""`--signal-budget` end to end on real stores: the settings chosen and recorded, the bytes they give, the
methods' losses on what the reader decodes, subsampled sequences in training, calibration without a forward of
its own, verify and repair."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from kdpipe.pipeline.plan import PlanConfig, make_plan
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.data import TrainBatches, UnitReader
from kdpipe.stage2_distill.methods import Context, StudentOutput
from kdpipe.stage2_distill.methods.base import Needs
from kdpipe.stage2_distill.methods.minilmv2 import MiniLMv2
from kdpipe.stage2_distill.methods.pkd import PKD
from kdpipe.stage2_distill.methods.tinybert import TinyBERT
from kdpipe.stage2_distill.trainer import DistillConfig, distill, method_loss
from kdpipe.storage import budget
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.schema import signal_specs
from test_cli import assert_user_error, kdpipe
from test_scale import assert_same_store

SIGNALS = dict(seq_len=32, top_k=8, hidden_layers="all", attention_layers="all", attention_form="factors",
               sequences_per_unit=8, quiet=True)
BUDGET = 80.0  # tiny Llama (H=32, 4 hidden + 3 attention layers, 640 B/token exact): rank 16, 2 of every 8


def make(teacher, corpus, out, **kw):
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(out), **{**SIGNALS, **kw}))
    return TeacherCache(out)


@pytest.fixture(scope="module")
def pair(teachers, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return make(teachers["llama"], corpus, root / "exact"), make(teachers["llama"], corpus, root / "budget",
                                                               signal_budget=BUDGET)


def stored_bytes_per_token(cache: TeacherCache) -> float:
    """Raw bytes of the per-sequence hidden-state and attention arrays, per corpus position."""
    m = cache.manifest
    return sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in signal_specs(m)
               if s.per_sequence and s.name.startswith(("hidden/", "attention/"))) / (m.data.num_sequences * 32)


def test_the_budget_chooses_fitting_settings_records_them_and_plan_says_the_same(pair, teachers):
    exact, cache = pair
    s, m = cache.manifest.signals, cache.manifest
    assert (s.hidden_codec, s.hidden_rank, s.attention_codec, s.signal_sequences, s.signal_budget) == \
        ("int8", 16, "int8", 2, BUDGET)
    assert m.subsampled and m.version == 2
    assert len(s.hidden_error) == 4 and all(0 < e < 1 for e in s.hidden_error)  # measured, per layer
    assert len(s.attention_error) == 3 and all(0 < e < 1e-3 for e in s.attention_error)
    assert stored_bytes_per_token(cache) <= BUDGET * 1.02  # the last unit's share rounds up
    assert stored_bytes_per_token(exact) == 640  # 4 hidden layers of 64 B, 3 of Q/K/V of 128
    n = m.data.num_sequences
    plan = make_plan(PlanConfig(str(teachers["llama"]), n * 32, 32, 8, 8, 2, "compact", 0, "all", "all", "factors",
                                signal_budget=BUDGET, sequences_per_unit=8, dtype="float32")).data
    chosen = plan["signal_settings"]
    assert (chosen["hidden_codec"], chosen["hidden_rank"], chosen["signal_sequences"]) == ("int8", 16, 2)
    assert plan["cache_bytes_per_token"]["hidden"] + plan["cache_bytes_per_token"]["attention"] <= BUDGET
    summary = json.loads(kdpipe("inspect", cache.path, "--json").stdout)
    assert summary["manifest"]["signals"]["signal_budget"] == BUDGET
    assert "int8" in kdpipe("inspect", cache.path).stdout


def test_plan_fits_a_100b_teacher_into_8kb_a_token():
    result = kdpipe("plan", "--teacher", "llama-100b", "--hidden-layers", "uniform:8", "--attention-layers", "last:2",
                    "--signal-budget", "8KB", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    per_token = data["cache_bytes_per_token"]
    assert per_token["hidden"] + per_token["attention"] <= 8192
    assert data["signal_settings"]["exact_bytes_per_token"] == 192_512
    assert data["signal_settings"]["hidden_rank"] >= 9216 // 4 and data["signal_settings"]["attention_rank"] == 32
    assert_user_error(kdpipe("plan", "--teacher", "llama-100b", "--hidden-layers", "uniform:8", "--attention-layers",
                             "last:2", "--signal-budget", "300B"), "raise --signal-budget to at least 379B")


def test_losses_on_the_compressed_cache_are_the_losses_on_the_exact_states_projected_the_same_way(teachers, corpus,
                                                                                                 tmp_path):
    """TinyBERT, PKD and MiniLMv2 terms from what the reader decodes, against the same terms from the exact
    cache's states projected by the stored code in float64 (and its exact factors): within the int8 error, and
    far closer to them than to the unprojected states."""
    exact = make(teachers["llama"], corpus, tmp_path / "exact")
    coded = make(teachers["llama"], corpus, tmp_path / "coded", hidden_rank=8, attention_codec="int8")
    teacher = coded.manifest.teacher
    ctx = Context(teacher=teacher, temperatures=[1.0], student_layers=2, student_hidden=24, total_steps=1,
                  teacher_attention_scaling=coded.manifest.signals.attention_scaling,
                  cached_hidden=list(range(teacher.num_layers + 1)))
    torch.manual_seed(0)
    methods = [TinyBERT({"alpha_pred": 0.0}, ctx), PKD({"alpha": 0.0}, ctx), MiniLMv2({}, ctx)]
    needs = Needs(topk=True, hidden=list(range(teacher.num_layers + 1)), factors=list(range(1, teacher.num_layers + 1)))
    rows = np.arange(8)
    b_coded = UnitReader(coded, needs).batch(UnitReader(coded, needs).read_units([0]), rows)
    b_exact = UnitReader(exact, needs).batch(UnitReader(exact, needs).read_units([0]), rows)
    b_proj = UnitReader(exact, needs).batch(UnitReader(exact, needs).read_units([0]), rows)
    for layer, code in coded.codecs().hidden.items():
        c, s, basis = code.center.double(), code.scale.double(), code.basis.double()
        y = (b_exact.hidden[layer].double() - c) / s
        b_proj.hidden[layer] = ((y @ basis @ basis.T) * s + c).float()
    g = torch.Generator().manual_seed(1)
    out = StudentOutput(logits=torch.zeros(8, 32, teacher.vocab_size),
                        hidden={i: torch.randn(8, 32, 24, generator=g) for i in range(3)},
                        factors={i: tuple(torch.randn(8, 2, 32, 12, generator=g) for _ in range(3)) for i in (1, 2)},
                        scaling=12 ** -0.5)
    for method in methods:
        for term, got in method.loss(b_coded, out, 0).items():
            if term in ("soft", "hard"):
                continue
            want, raw = method.loss(b_proj, out, 0)[term], method.loss(b_exact, out, 0)[term]
            assert abs(got - want) <= 1e-2 * abs(want) + 1e-5, (method.name, term, got, want)
            if term in ("hid", "emb", "pt"):  # the projection moves them; the int8 code barely does
                assert abs(got - raw) > 10 * abs(got - want), (method.name, term)


def test_subsampled_training_batches_hold_their_share_and_methods_see_exactly_those_rows(pair):
    """Every batch holds the sequences that carry hidden states (2 of 8 per unit: 1 of a batch of 4, 2 when the
    method contrasts), their states equal the exact cache's for those sequences, and a method's loss is its loss
    on the batch of those rows alone."""
    exact, cache = pair
    full = TeacherCache(exact.path)
    same = make_float16_subsampled(cache)
    units = list(range(cache.manifest.layout.num_units))
    needs = Needs(topk=True, hidden=[0, 1, 2], factors=[3])
    for least in (1, 2):
        batches = TrainBatches(same, needs, units, 4, seed=0, least_signal_rows=least)
        for _ in range(12):
            b = next(batches)
            assert len(b.signal_rows) >= least and b.hidden[0].shape[0] == len(b.signal_rows)
            seqs = b.sequence_ids[b.signal_rows].numpy()
            assert (same.signal_rows(seqs) >= 0).all()
            np.testing.assert_array_equal(b.hidden[2].numpy(), full.hidden(2, seqs))
            np.testing.assert_array_equal(b.factors[3][0].numpy(), full.attention_factors(3, seqs)[0])
        batches.close()
    ctx = Context(teacher=full.manifest.teacher, temperatures=[1.0, 2.0], student_layers=2, student_hidden=16,
                  total_steps=1, cached_hidden=[0, 1, 2])
    method = PKD({"alpha": 0.0, "pooling": "token"}, ctx)
    g = torch.Generator().manual_seed(0)
    out = StudentOutput(logits=torch.randn(4, 32, full.manifest.teacher.vocab_size, generator=g),
                        hidden={1: torch.randn(4, 32, 16, generator=g)})
    view = b.signal_view()
    got = method_loss(method, b, out, 0, 1)
    want = method.loss(view, out.rows(b.signal_rows), 0)
    assert view.input_ids.shape[0] == len(b.signal_rows) and got.keys() == want.keys()
    for term in got:
        torch.testing.assert_close(got[term], want[term])


def make_float16_subsampled(cache: TeacherCache) -> TeacherCache:
    """The budget cache's teacher and data again, float16 codes, 2 of 8 sequences: exact values, fewer rows."""
    m = cache.manifest
    out = cache.path + "-float16"
    if not (shutil.os.path.exists(out)):
        extract(ExtractConfig(teacher=m.teacher.name, data=m.data.sources, out=out, signal_fraction=0.25, **SIGNALS))
    return TeacherCache(out)


def test_calibration_costs_no_forward_of_its_own(teachers, corpus, tmp_path):
    """The compact top-k and int8 codes are fitted on unit 0's first batches, which are then stored, not rerun:
    the teacher runs exactly as many forwards as for a cache that calibrates nothing."""
    from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer, resolve_teacher

    source = resolve_teacher(str(teachers["llama"]))
    model, tokenizer = load_teacher_and_tokenizer(source)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    counts = {}
    for name, kw in (("plain", dict(logit_codec="float16")), ("coded", dict(signal_budget=BUDGET))):
        calls.clear()
        extract(ExtractConfig(teacher=str(teachers["llama"]), data=[str(corpus)], out=str(tmp_path / name),
                              **SIGNALS, **kw), model, tokenizer)
        counts[name] = len(calls)
    assert counts["coded"] == counts["plain"]
    assert TeacherCache(tmp_path / "coded").manifest.compact_topk


def lose_a_chunk_verify_then_resume(cache: TeacherCache, path, array: str, needle: str, **flags) -> None:
    """Delete the second chunk of `array` in a copy of `cache` at `path`: verify names it (`needle`), --repair
    clears the unit, a resume with the cache's own flags makes the copy equal the original again."""
    shutil.copytree(cache.path, path)
    chunk = next((path / array).rglob("c/1/*"))
    chunk.unlink() if chunk.is_file() else shutil.rmtree(chunk)
    result = kdpipe("verify", path)
    assert result.exit_code != 0 and array in result.output and needle in result.output
    assert kdpipe("verify", "--repair", path).exit_code != 0
    m = cache.manifest
    extract(ExtractConfig(teacher=m.teacher.name, data=m.data.sources, out=str(path), resume=True,
                          **{**SIGNALS, "seq_len": m.data.seq_len, **flags}))
    assert kdpipe("verify", path).exit_code == 0
    assert_same_store(path, cache.path)


def test_verify_repairs_a_compressed_signal_chunk_and_resume_restores_it(pair, tmp_path):
    lose_a_chunk_verify_then_resume(pair[1], tmp_path / "c", "hidden/layer_002", "work unit 1", signal_budget=BUDGET)


def test_signal_settings_mistakes_are_one_line(teachers, corpus, tmp_path):
    from test_cli import extract_args

    def run(*extra):
        return kdpipe(*extract_args(teachers["llama"], corpus, tmp_path / "c", "--hidden-layers", "all", *extra))

    assert_user_error(run("--signal-budget", "2"), "raise --signal-budget to at least 5B")
    assert_user_error(run("--signal-budget", "8KB", "--hidden-rank", "8"), "give the budget or those, not both")
    assert_user_error(run("--hidden-rank", "64"), "--hidden-rank 64 is more than the teacher's 32")
    assert_user_error(run("--attention-layers", "all", "--attention-form", "probs", "--attention-codec", "int8"),
                      "--attention-dtype uint8")
    assert_user_error(run("--signal-fraction", "0"), "--signal-fraction must be in (0, 1]")
    assert_user_error(run("--position-fraction", "1.5"), "--position-fraction must be in (0, 1]")
    assert_user_error(run("--attention-layers", "all", "--attention-form", "probs", "--position-fraction", "0.5"),
                      "use --attention-form factors")
    assert_user_error(run("--position-fraction", "0.25", "--position-spans", "9"), "lower it")
    assert_user_error(run("--signal-budget", "8KB", "--position-fraction", "0.5"), "give the budget or those")
    assert_user_error(run("--signal-budget", "8KB", "--attention-rank", "4"), "give the budget or those")
    assert_user_error(run("--attention-layers", "all", "--attention-rank", "16"),
                      "--attention-rank 16 is more than the teacher's 8 dimensions a head")
    assert_user_error(run("--attention-layers", "all", "--attention-form", "probs", "--attention-rank", "4"),
                      "--attention-rank projects Q/K/V factors: use --attention-form factors")
    assert not (tmp_path / "c").exists()


def test_two_teachers_whose_signals_come_from_different_sequences_are_refused(pair, teachers, corpus, tmp_path):
    exact, cache = pair
    with pytest.raises(Exception, match="come from different sequences"):
        distill(DistillConfig(cache=[cache.path, exact.path], student="teacher:layers=2", out=str(tmp_path / "r"),
                              method=["mt_bert"], steps=1, batch_size=4, quiet=True))


def test_a_subsampled_cache_trains_every_intermediate_method_from_the_cli(pair, tmp_path):
    _, cache = pair
    for spec in ("tinybert", "lrc_bert", "theseus"):
        result = kdpipe("distill", "--cache", cache.path, "--student", "teacher:layers=2", "--out",
                        tmp_path / spec, "--method", spec, "--method", "kd", "--steps", "3", "--batch-size", "4",
                        "--quiet")
        assert result.exit_code == 0, result.output
    assert budget.fit(BUDGET, budget.Shapes(32, 4, 3, 4, 2, 8, 32, "factors", 8)).hidden_rank == 16


def test_a_crafted_signal_row_or_code_is_refused(pair, tmp_path):
    """A cache is input: rows that point another unit's sequences at a unit's hidden states, or a code whose scale
    is zero, are refused before any state is decoded."""
    from kdpipe.storage.integrity import DamagedCache

    _, cache = pair
    path = tmp_path / "c"
    shutil.copytree(cache.path, path)
    rows = zarr.open_array(str(path / "tokens" / "signal_row"), mode="r+")
    good = np.asarray(rows[:])
    moved = good.copy()
    first, second = np.flatnonzero(good >= 0)[:2]
    moved[first], moved[second] = good[second], good[first]  # two sequences swap their states
    rows[:] = moved
    with pytest.raises(DamagedCache, match="signal_row of work unit 0"):
        TeacherCache(path).hidden(0, [int(second)])
    rows[:] = good
    affine = zarr.open_array(str(path / "hidden" / "layer_001_affine"), mode="r+")
    values = np.asarray(affine[:])
    values[1, 3] = 0.0
    affine[:] = values
    with pytest.raises(DamagedCache, match="layer_001_affine"):
        TeacherCache(path).hidden(1, [int(first)])
