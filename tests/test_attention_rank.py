"""Q/K/V factors projected per head (`--attention-rank`, storage.signal_codec.FactorCodec): the code against a
float64 projection, the scores it exists to keep against plain principal directions, and a real store whose
decoded factors and attention losses are the exact cache's projected the same way."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.data import UnitReader
from kdpipe.stage2_distill.methods import Context, StudentOutput
from kdpipe.stage2_distill.methods.base import Needs
from kdpipe.stage2_distill.methods.minilmv2 import MiniLMv2
from kdpipe.stage2_distill.methods.tinybert import TinyBERT
from kdpipe.storage.integrity import DamagedCache
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.signal_codec import FactorCodec, score_metrics
from test_cli import kdpipe

D, R = 32, 8


def grouped_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, 4, D] and k [n, 2, D] (two query heads a key head) whose largest variances lie in different
    directions: a key's widest dimensions are ones its queries barely read, as RoPE's low-frequency pairs are."""
    g = torch.Generator().manual_seed(seed)
    q_scale = torch.tensor([4.0] * 8 + [0.3] * 8 + [1.0] * 16)  # the scores live in the first 8 directions,
    k_scale = torch.tensor([2.0] * 8 + [6.0] * 8 + [0.3] * 16)  # a key's widest are the next 8
    mix = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(7)))[0]  # shared by calls
    q = (torch.randn(n, 4, D, generator=g) * q_scale) @ mix + 1.5
    k = (torch.randn(n, 2, D, generator=g) * k_scale) @ mix - 0.5
    return q, k


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[n, h, D], [n, kv, D] -> [h, n, n] in float64, each query head against the key head it reads."""
    q, k = q.double().transpose(0, 1), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(0, 1)
    return q @ k.transpose(-1, -2)


def roundtrip(code: FactorCodec, x: torch.Tensor) -> torch.Tensor:
    """[n, h, D] through encode/decode as one batch of vectors."""
    return code.decode(*code.encode(x.transpose(0, 1)[None]))[0].transpose(0, 1)


def test_decode_of_encode_is_the_centered_projection_within_the_int8_step():
    """decoder^T encoder = I, so P = decoder encoder^T is a projection and decode(encode(x)) is c + P (x - c),
    computed here in float64, up to each coordinate's half step carried through the decoder."""
    q, k = grouped_factors(2048, 0)
    metric_q, metric_k = score_metrics(q, k)
    for x, metric in ((q, metric_q), (k, metric_k), (k, None)):
        code = FactorCodec.fit(x, R, metric)
        enc, dec, c = code.encoder.double(), code.decoder.double(), code.center.double()
        eye = torch.eye(R, dtype=torch.float64).expand(x.shape[1], R, R)
        assert torch.allclose(dec.transpose(-1, -2) @ enc, eye, atol=1e-4)
        held = grouped_factors(256, 1)[0 if x is q else 1]
        projected = torch.einsum("hdr,her,nhe->nhd", dec, enc, held.double() - c) + c
        z, step = code.encode(held.transpose(0, 1)[None])
        back = code.decode(z, step)[0].transpose(0, 1).double()
        bound = (step[0].T.double() / 2 * (1 + 2 ** -10) * np.sqrt(R))[..., None] * dec.norm(dim=(1, 2))[None, :, None]
        assert ((back - projected).abs() <= bound + 1e-4).all()


def test_score_aware_codes_keep_the_scores_plain_principal_directions_lose():
    """At 8 of 32 dimensions, Q and K fitted in each other's second moments keep held-out scores q.k several
    times better than each one's own principal directions; they are also the optimum in that metric, so no
    rank-8 projection of K does better on E|q.(k' - k)|^2 (checked against the plain one, without int8)."""
    q, k = grouped_factors(4096, 0)
    held_q, held_k = grouped_factors(512, 1)
    exact = scores(held_q, held_k)
    metric_q, metric_k = score_metrics(q, k)
    aware = scores(roundtrip(FactorCodec.fit(q, R, metric_q), held_q),
                   roundtrip(FactorCodec.fit(k, R, metric_k), held_k))
    plain = scores(roundtrip(FactorCodec.fit(q, R), held_q), roundtrip(FactorCodec.fit(k, R), held_k))
    error = lambda s: float((s - exact).pow(2).sum() / exact.pow(2).sum())  # noqa: E731
    assert error(aware) < 0.3 * error(plain), (error(aware), error(plain))

    def weighted(code: FactorCodec) -> float:  # tr(W E[(k' - k)(k' - k)^T]) without quantization
        y = k.double() - code.center.double()
        e = torch.einsum("hdr,her,nhe->nhd", code.decoder.double(), code.encoder.double(), y) - y
        return float(torch.einsum("nhd,hde,nhe->", e, metric_k, e))
    assert weighted(FactorCodec.fit(k, R, metric_k)) < weighted(FactorCodec.fit(k, R))


SIGNALS = dict(seq_len=32, top_k=8, hidden_layers="none", attention_layers="all", attention_form="factors",
               sequences_per_unit=8, quiet=True)


@pytest.fixture(scope="module")
def pair(teachers, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("attention_rank")
    for name, kw in (("exact", {}), ("coded", {"attention_rank": 4})):
        extract(ExtractConfig(teacher=str(teachers["llama"]), data=[str(corpus)], out=str(root / name),
                              **SIGNALS, **kw))
    return TeacherCache(root / "exact"), TeacherCache(root / "coded")


def test_the_store_records_the_rank_and_the_reader_decodes_the_exact_factors_projected(pair):
    exact, coded = pair
    m = coded.manifest
    assert (m.version, m.signals.attention_rank, m.signals.attention_codec) == (5, 4, "int8")
    assert exact.manifest.version < 5  # written with the lowest version that holds it
    assert len(m.signals.attention_error) == 3 and all(0 < e < 1 for e in m.signals.attention_error)
    heads, d = m.teacher.num_heads, m.teacher.head_dim
    assert zarr.open_group(coded.path, mode="r")["attention/layer_001_q"].shape[1:] == (heads, 32, 4)
    rows = list(range(8))
    for layer in m.signals.attention_layers:
        for part, want, got in zip("qkv", exact.attention_factors(layer, rows), coded.attention_factors(layer, rows)):
            code = coded.codecs().factors[layer, part]
            c, enc, dec = code.center.double(), code.encoder.double(), code.decoder.double()
            x = torch.from_numpy(want).double()  # [n, h, T, d]
            projected = torch.einsum("hdr,her,nhte->nhtd", dec, enc, x - c[:, None]) + c[:, None]
            assert got.shape == want.shape and got.shape[-1] == d
            err = float((torch.from_numpy(got).double() - projected).pow(2).sum() / projected.pow(2).sum())
            assert err < 1e-3, (layer, part, err)
    assert kdpipe("verify", coded.path).exit_code == 0
    assert "projected to 4 dims a head" in kdpipe("inspect", coded.path).stdout
    assert json.loads(kdpipe("inspect", coded.path, "--json").stdout)["manifest"]["signals"]["attention_rank"] == 4


def test_attention_losses_on_the_projected_cache_are_those_of_the_exact_factors_projected(pair):
    """TinyBERT's attention term and MiniLMv2's relations from what the reader decodes, against the same terms
    from the exact cache's factors put through the stored codes in float64: within the int8 error."""
    exact, coded = pair
    teacher = coded.manifest.teacher
    ctx = Context(teacher=teacher, temperatures=[1.0], student_layers=2, student_hidden=24, total_steps=1,
                  teacher_attention_scaling=coded.manifest.signals.attention_scaling, cached_hidden=[])
    torch.manual_seed(0)
    methods = [TinyBERT({"alpha_pred": 0.0, "alpha_hid": 0.0, "alpha_emb": 0.0}, ctx), MiniLMv2({}, ctx)]
    needs = Needs(topk=True, factors=list(range(1, teacher.num_layers + 1)))
    rows = np.arange(8)
    b_coded = UnitReader(coded, needs).batch(UnitReader(coded, needs).read_units([0]), rows)
    b_proj = UnitReader(exact, needs).batch(UnitReader(exact, needs).read_units([0]), rows)
    b_exact = UnitReader(exact, needs).batch(UnitReader(exact, needs).read_units([0]), rows)
    for layer, factors in b_proj.factors.items():
        out = []
        for part, x in zip("qkv", factors):
            code = coded.codecs().factors[layer, part]
            c = code.center.double()[:, None]
            p = torch.einsum("hdr,her->hde", code.decoder.double(), code.encoder.double())
            out.append((torch.einsum("hde,nhte->nhtd", p, x.double() - c) + c).float())
        b_proj.factors[layer] = tuple(out)
    g = torch.Generator().manual_seed(1)
    out = StudentOutput(logits=torch.zeros(8, 32, teacher.vocab_size),
                        hidden={i: torch.randn(8, 32, 24, generator=g) for i in range(3)},
                        factors={i: tuple(torch.randn(8, 2, 32, 12, generator=g) for _ in range(3)) for i in (1, 2)},
                        scaling=12 ** -0.5)
    compared = 0
    for method in methods:
        for term, got in method.loss(b_coded, out, 0).items():
            if term in ("soft", "hard") or not float(got):
                continue
            want, raw = method.loss(b_proj, out, 0)[term], method.loss(b_exact, out, 0)[term]
            assert abs(got - want) <= 1e-2 * abs(want) + 1e-5, (method.name, term, got, want)
            assert abs(got - raw) > 2 * abs(got - want), (method.name, term, got, want, raw)  # rank 4 of 8 moves it
            compared += 1
    assert compared >= 2


@pytest.mark.parametrize("part", ["center", "encoder", "decoder"])
def test_a_crafted_factor_code_is_refused(pair, part, tmp_path):
    """A cache is input: a code that is not finite is refused before any factor is decoded."""
    shutil.copytree(pair[1].path, tmp_path / "c")
    zarr.open_array(str(tmp_path / "c" / "attention" / f"layer_002_k_{part}"), mode="r+")[0, 1] = np.nan
    with pytest.raises(DamagedCache, match=r"the code of attention/layer_002_k \(.*_decoder\) is not finite"):
        TeacherCache(tmp_path / "c").attention_factors(2, [0])


def test_verify_repairs_a_projected_factor_chunk_and_resume_restores_it(pair, tmp_path):
    """A lost chunk of int8 codes is named by verify; the resume re-encodes that unit with the stored per-head
    codes (not a new fit), so the repaired cache equals the original byte for byte."""
    from test_signal_budget import lose_a_chunk_verify_then_resume

    lose_a_chunk_verify_then_resume(pair[1], tmp_path / "c", "attention/layer_001_q", "sequences 8..15",
                                    hidden_layers="none", attention_rank=4)
