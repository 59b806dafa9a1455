"""The compact top-k encoding (storage.topk_codec) against float64, at the edges: peaked and flat teachers,
tails down to 1e-30, k < V and k = V, log-probabilities below the lowest level; and the KD loss it feeds."""

import numpy as np
import pytest
import torch
import zarr

from kdpipe.stage2_distill.losses import bucket_kl
from kdpipe.storage.integrity import DamagedCache
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.topk_codec import (ERROR_BOUND, FLOOR, LEVELS, QUANTIZATION_ERROR, decode, encode, rank_table,
                                       ranks_of)

V = 500


def teacher(rng, n: int, scale: float) -> np.ndarray:
    """[n, V] float64 log-probabilities; `scale` sets how peaked they are."""
    z = rng.standard_normal((n, V)) * scale
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def topk(logp: np.ndarray, k: int):
    ids = np.argsort(-logp, -1, kind="stable")[:, :k]
    top = np.take_along_axis(logp, ids, -1)
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    return ids, top, np.logaddexp.reduce(rest, axis=-1)


@pytest.mark.parametrize("scale,k", [(0.5, 16), (3.0, 16), (12.0, 16), (40.0, 64), (2.0, V)])
def test_round_trip_against_float64(scale, k):
    rng = np.random.default_rng(int(scale * 10) + k)
    logp = teacher(rng, 256, scale)
    ids, top, tail = topk(logp, k)
    table = rank_table(np.bincount(ids[:8].ravel(), minlength=V), np.zeros(V, np.int64))
    slots, levels = encode(ids, top.astype(np.float32), ranks_of(table), np.uint16)
    assert slots.dtype == np.uint16 and levels.dtype == np.uint8

    got_ids, raw = decode(slots, levels, table, None)
    assert (got_ids[:, 0] == ids[:, 0]).all(), "slot 0 is the argmax"
    assert all(set(a) == set(b) for a, b in zip(got_ids, ids)), "ids are exact"
    true = np.take_along_axis(logp, got_ids, -1)
    above = true >= -FLOOR
    assert np.abs(raw - true)[above].max() <= QUANTIZATION_ERROR + 1e-6
    assert (raw[~above] == np.float32(-FLOOR)).all(), "below the lowest level reads as it"
    assert (np.diff(raw, axis=-1) <= 0).all()

    _, scaled = decode(slots, levels, table, tail.astype(np.float32))
    assert np.abs(scaled - true)[above].max() <= ERROR_BOUND + 1e-6
    mass = np.exp(scaled.astype(np.float64)).sum(-1) + np.exp(tail)
    np.testing.assert_allclose(mass, 1.0, atol=1e-6)


def test_levels_are_fine_where_the_mass_is():
    steps = np.diff(LEVELS)
    assert steps[0] < 1 / 60 and steps.max() == 0.25 and (np.diff(steps) >= 0).all()
    assert 38.9 < FLOOR < 39


def test_rank_table_orders_by_topk_then_corpus_then_id():
    topk_counts = np.array([0, 5, 0, 5, 1, 0])
    corpus = np.array([9, 1, 3, 2, 0, 3])
    assert rank_table(topk_counts, corpus).tolist() == [3, 1, 4, 0, 2, 5]
    assert ranks_of(np.array([2, 0, 1])).tolist() == [1, 2, 0]


def test_kd_loss_from_the_compact_top_k_follows_the_exact_one():
    """The bucket KL (value and gradient) from the decoded cache against the same loss from exact float64
    top-k log-probabilities, for a student far from and near the teacher."""
    rng = np.random.default_rng(0)
    logp = teacher(rng, 128, 3.0)
    ids, top, tail = topk(logp, 32)
    table = rank_table(np.bincount(ids.ravel(), minlength=V), np.zeros(V, np.int64))
    got_ids, got = decode(*encode(ids, top.astype(np.float32), ranks_of(table), np.uint16), table,
                          tail.astype(np.float32))
    for noise in (3.0, 0.3):
        student = torch.tensor(logp + rng.standard_normal(logp.shape) * noise, requires_grad=True)
        exact = bucket_kl(student[None], torch.from_numpy(ids)[None], torch.from_numpy(top)[None],
                          t_logtail=torch.from_numpy(tail)[None])
        (g_exact,) = torch.autograd.grad(exact, student)
        compact = bucket_kl(student[None], torch.from_numpy(got_ids)[None], torch.from_numpy(got).double()[None],
                            t_logtail=torch.from_numpy(tail)[None])
        (g_compact,) = torch.autograd.grad(compact, student)
        assert abs(compact.item() - exact.item()) <= 0.02 * exact.item() + 1e-3
        cosine = torch.nn.functional.cosine_similarity(g_exact.flatten(), g_compact.flatten(), dim=0)
        assert cosine > 0.99


def test_an_id_table_that_is_not_a_permutation_is_refused(layer_cache, tmp_path):
    import shutil
    path = tmp_path / "c"
    shutil.copytree(layer_cache, path)
    cache = TeacherCache(path)
    assert cache.manifest.signals.topk_codec == "compact-v1"
    table = np.asarray(zarr.open_array(str(path / "logits" / "id_table"))[:])
    table[1] = table[0]
    zarr.open_array(str(path / "logits" / "id_table"), mode="r+")[:] = table
    with pytest.raises(DamagedCache, match="id_table is not a permutation"):
        TeacherCache(path).topk_logprobs(slice(0, 2))
