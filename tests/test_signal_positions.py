"""Hidden states and attention at a subset of each sequence's positions (`--position-fraction`, and the
`--signal-budget` ladder): what is stored is the exact states at the drawn positions, attention among them
follows the model's own sliding window, and a method's loss is its loss on the exact states indexed there."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.data import UnitReader
from kdpipe.stage2_distill.features import causal_scores
from kdpipe.stage2_distill.methods import Context, StudentOutput
from kdpipe.stage2_distill.methods.base import Batch, Needs
from kdpipe.stage2_distill.methods.pkd import PKD
from kdpipe.stage2_distill.methods.tinybert import TinyBERT
from kdpipe.stage2_distill.trainer import method_loss
from kdpipe.storage.attention import key_mask
from kdpipe.storage.integrity import DamagedCache
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.schema import draw_positions
from test_cli import assert_user_error, kdpipe

T, P = 32, 8
SIGNALS = dict(seq_len=T, top_k=8, hidden_layers="all", attention_layers="all", attention_form="factors",
               sequences_per_unit=8, quiet=True)


@pytest.fixture(scope="module")
def caches(teachers, corpus, tmp_path_factory):
    """A sliding-window teacher (Mistral, window 8 of 32), exact and at 8 of every 32 positions (float16 both)."""
    root = tmp_path_factory.mktemp("positions")
    made = []
    for name, kw in (("exact", {}), ("positions", dict(position_fraction=P / T))):
        extract(ExtractConfig(teacher=str(teachers["mistral"]), data=[str(corpus)], out=str(root / name),
                              **SIGNALS, **kw))
        made.append(TeacherCache(root / name))
    return made


def test_the_stored_states_are_the_exact_states_at_stratified_positions(caches):
    exact, cache = caches
    m = cache.manifest
    assert m.position_subsampled and m.signals.signal_positions == P and not exact.manifest.position_subsampled
    assert m.version == 3 and exact.manifest.version < 3  # a kdpipe that cannot read positions says to upgrade
    pos, lengths = cache.signal_positions(), cache.lengths()
    assert pos.shape == (m.data.num_sequences, P) and (np.diff(pos, axis=1) > 0).all()
    full = lengths >= P
    strata = np.arange(P + 1)[None, :] * lengths[full, None] // P  # one position in each P-th of the sequence
    assert ((pos[full] >= strata[:, :-1]) & (pos[full] < strata[:, 1:])).all()
    assert len(np.unique(pos[full][:, 0])) > 1  # drawn, not fixed
    for layer in m.signals.hidden_layers:
        np.testing.assert_array_equal(cache.hidden(layer), np.take_along_axis(exact.hidden(layer), pos[:, :, None], 1))
    for layer in m.signals.attention_layers:
        for got, want in zip(cache.attention_factors(layer), exact.attention_factors(layer)):
            assert got.shape[2] == P
            np.testing.assert_array_equal(got, np.take_along_axis(want, pos[:, None, :, None], 2))


def test_attention_among_the_positions_is_the_models_attention_renormalized_over_them(caches):
    """From the exact cache's full attention [T, T] under the model's own sliding window: the rows and columns
    of the stored positions, each row renormalized over its allowed keys among them."""
    exact, cache = caches
    pos = cache.signal_positions()
    windows = cache.manifest.signals.attention_windows
    assert any(windows) and max(windows) < T  # the window bites within a sequence
    for layer in cache.manifest.signals.attention_layers:
        full = exact.attention_probs(layer).astype(np.float64)  # [n, h, T, T]
        with np.errstate(divide="ignore"):
            scores = np.log(np.take_along_axis(np.take_along_axis(full, pos[:, None, :, None], 2),
                                               pos[:, None, None, :], 3))
        # log p_ij - log p_ij' = s_ij - s_ij': keys the window or causality masks have p = 0 (log -inf) alike
        want = np.exp(scores - scores.max(-1, keepdims=True))
        want = np.nan_to_num(want / want.sum(-1, keepdims=True))
        got = cache.attention_probs(layer)
        assert got.shape == (len(pos), exact.manifest.teacher.num_heads, P, P)
        np.testing.assert_allclose(got, want, atol=2e-3)
        real = pos < cache.lengths()[:, None]  # a real token's row sums to 1: it always sees itself
        np.testing.assert_allclose(got.sum(-1).transpose(0, 2, 1)[real], 1.0, atol=1e-5)


def test_a_methods_loss_is_its_loss_on_the_exact_states_at_those_positions(caches):
    """TinyBERT's hidden and attention terms and PKD's per-token term, trained from the position cache (student
    outputs over every position), against the same terms computed directly: the exact cache's states and the
    full [T, T] teacher and student score matrices, indexed at the stored positions."""
    exact, cache = caches
    m = cache.manifest
    teacher = m.teacher
    windows = dict(zip(m.signals.attention_layers, m.signals.attention_windows))
    ctx = Context(teacher=teacher, temperatures=[1.0], student_layers=2, student_hidden=24, total_steps=1,
                  teacher_attention_scaling=m.signals.attention_scaling, teacher_windows=windows,
                  cached_hidden=list(range(teacher.num_layers + 1)))
    torch.manual_seed(0)
    tinybert, pkd = TinyBERT({"alpha_pred": 0.0}, ctx), PKD({"alpha": 0.0, "pooling": "token"}, ctx)
    needs = Needs(topk=True, hidden=list(range(teacher.num_layers + 1)), factors=list(range(1, teacher.num_layers + 1)))
    rows = np.arange(8)
    batch = UnitReader(cache, needs).batch(UnitReader(cache, needs).read_units([0]), rows)
    full = UnitReader(exact, needs).batch(UnitReader(exact, needs).read_units([0]), rows)
    g = torch.Generator().manual_seed(1)
    out = StudentOutput(logits=torch.zeros(8, T, teacher.vocab_size),
                        hidden={i: torch.randn(8, T, 24, generator=g) for i in range(3)},
                        factors={i: tuple(torch.randn(8, 2, T, 12, generator=g) for _ in range(3)) for i in (1, 2)},
                        scaling=12 ** -0.5)
    pos = batch.signal_positions
    assert pos.shape == (8, P)
    got = method_loss(tinybert, batch, out, 0, 1)

    def at(x, dim):  # index [b, ..., T, ...] at each row's positions, by plain indexing
        return torch.stack([x[b].index_select(dim - 1, pos[b]) for b in range(len(pos))])

    mask = at(full.mask, 1)
    want_hid = 0.0  # the emb term is the same with layer 0
    for s, t in tinybert.pairs:
        want_hid = want_hid + F.mse_loss(tinybert.hidden(tinybert.project(at(out.hidden[s], 1)), t)[mask],
                                         tinybert.hidden(at(full.hidden[t], 1), t)[mask])
    torch.testing.assert_close(got["hid"], want_hid, rtol=1e-5, atol=1e-6)
    want_att = 0.0
    for s, t in tinybert.pairs:
        t_full = causal_scores(*full.factors[t][:2], m.signals.attention_scaling, 2,
                               key_mask(T, T, True, None, window=windows[t]))
        s_full = causal_scores(*out.factors[s][:2], out.scaling, teacher.num_heads)
        want_att = want_att + F.mse_loss(at(at(s_full, 2), 3), at(at(t_full, 2), 3))
    torch.testing.assert_close(got["att"], want_att, rtol=1e-5, atol=1e-6)
    # PKD's normalized per-token distances on a batch of the exact states indexed by hand
    indexed = Batch(input_ids=at(full.input_ids, 1), mask=mask, topk_ids=at(full.topk_ids, 1),
                    topk_logprobs=at(full.topk_logprobs, 1), logsumexp=at(full.logsumexp, 1),
                    logtail=at(full.logtail, 1), hidden={t: at(x, 1) for t, x in full.hidden.items()})
    student = StudentOutput(logits=at(out.logits, 1), hidden={k: at(v, 1) for k, v in out.hidden.items()})
    want = pkd.loss(indexed, student, 0)
    torch.testing.assert_close(method_loss(pkd, batch, out, 0, 1)["pt"], want["pt"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want["pt"], pkd.loss(full, out, 0)["pt"])  # every position's distances differ


def test_every_intermediate_method_trains_from_the_cli_and_theseus_is_refused(caches, tmp_path):
    _, cache = caches
    for spec in ("tinybert", "minilm", "minilmv2", "lrc_bert", "mgskd", "pkd"):
        result = kdpipe("distill", "--cache", cache.path, "--student", "teacher:layers=2", "--out",
                        tmp_path / spec, "--method", spec, "--method", "kd", "--steps", "2", "--batch-size", "4",
                        "--quiet")
        assert result.exit_code == 0, (spec, result.output)
    assert_user_error(kdpipe("distill", "--cache", cache.path, "--student", "teacher:layers=2", "--out",
                             tmp_path / "theseus", "--method", "theseus", "--steps", "2", "--quiet"),
                      "re-extract without --position-fraction")
    assert not (tmp_path / "theseus").exists()
    assert "at 8 positions of every sequence" in kdpipe("inspect", cache.path).stdout


def test_crafted_positions_are_refused(caches, tmp_path):
    """A cache is input: positions out of range or out of order would index another token's state."""
    _, cache = caches
    path = tmp_path / "c"
    shutil.copytree(cache.path, path)
    arr = zarr.open_array(str(path / "tokens" / "signal_positions"), mode="r+")
    good = np.asarray(arr[:])
    for bad in (T, -1):
        crafted = good.copy()
        crafted[0, -1] = bad
        arr[:] = crafted
        with pytest.raises(DamagedCache, match="outside 0..31"):
            TeacherCache(path).signal_positions([0])
    crafted = good.copy()
    crafted[0, :2] = crafted[0, 1::-1]
    arr[:] = crafted
    with pytest.raises(DamagedCache, match="not ascending"):
        TeacherCache(path).attention_probs(1, [0])
    result = kdpipe("distill", "--cache", path, "--student", "teacher:layers=2", "--out", tmp_path / "r",
                    "--method", "tinybert", "--steps", "1", "--quiet")
    assert result.exit_code != 0 and "signal_positions" in result.output


@pytest.mark.parametrize("spans", [1, 2, 3])
def test_positions_in_spans_are_contiguous_runs_one_in_each_part_of_the_sequence(spans):
    p, t = 8, 64
    m = SimpleNamespace(signal_positions=p, data=SimpleNamespace(seq_len=t),
                        signals=SimpleNamespace(seed=0, position_spans=spans))
    lengths = np.array([64] * 200 + [40] * 200 + [8, 5])
    pos = draw_positions(m, 3, lengths)
    np.testing.assert_array_equal(pos, draw_positions(m, 3, lengths))  # a function of (seed, unit, lengths)
    assert (np.diff(pos, axis=1) > 0).all()
    np.testing.assert_array_equal(pos[-1], np.arange(p))  # shorter than P: every position, then padding
    ends = np.arange(spans + 1) * p // spans
    for i in range(spans):
        run = pos[:-1, ends[i]:ends[i + 1]]
        assert (np.diff(run, axis=1) == 1).all()  # contiguous
        part = ends[i] * lengths[:-1, None] // p, ends[i + 1] * lengths[:-1, None] // p
        assert ((run >= part[0]) & (run < part[1])).all()  # within its own part of the sequence
        assert len(np.unique(run[:200, 0])) > 5  # at a drawn offset


def test_verify_names_a_lost_positions_chunk_and_a_resume_restores_it(caches, tmp_path):
    from test_signal_budget import lose_a_chunk_verify_then_resume

    lose_a_chunk_verify_then_resume(caches[1], tmp_path / "c", "tokens/signal_positions", "sequences 8..15",
                                    position_fraction=P / T)
