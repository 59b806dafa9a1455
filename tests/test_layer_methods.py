"""Intermediate-layer methods: each loss against a direct computation of the paper's formula on hand-built
tensors, and a few dozen steps from a tiny teacher's cache in which the method's own loss falls."""

import json

import numpy as np
import pytest
import torch

from kdpipe.errors import UserError
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.methods import Batch, Context, StudentOutput
from kdpipe.stage2_distill.methods.minilm import MiniLM
from kdpipe.stage2_distill.methods.minilmv2 import MiniLMv2
from kdpipe.stage2_distill.methods.pkd import PKD
from kdpipe.stage2_distill.methods.alp_kd import ALPKD
from kdpipe.stage2_distill.methods.ckd import CKD
from kdpipe.stage2_distill.methods.mobilebert import MobileBERT
from kdpipe.stage2_distill.methods.rail_kd import RAILKD
from kdpipe.stage2_distill.methods.tinybert import TinyBERT
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from kdpipe.storage.manifest import TeacherInfo
from tiny import save_teacher

B, T = 2, 5


def teacher_info(layers=4, hidden=32, heads=4, kv=2) -> TeacherInfo:
    return TeacherInfo(name="t", architecture="x", num_layers=layers, hidden_size=hidden, num_heads=heads,
                       num_kv_heads=kv, head_dim=hidden // heads, vocab_size=11, dtype="float32", config_sha256="")


def test_minilmv2_equals_the_relation_formula():
    g = torch.Generator().manual_seed(0)
    tq, tk, tv = (torch.randn(B, h, T, 8, generator=g) for h in (4, 2, 2))  # grouped-query teacher
    sq, sk, sv = (torch.randn(B, 2, T, 8, generator=g) for _ in range(3))
    ctx = Context(teacher=teacher_info(), temperatures=[1.0], student_layers=2, student_hidden=16, total_steps=1)
    method = MiniLMv2({"relation_heads": 2}, ctx)
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), mask=torch.ones(B, T, dtype=torch.bool),
                  factors={4: (tq, tk, tv)})
    out = StudentOutput(logits=torch.zeros(B, T, 11), factors={2: (sq, sk, sv)})
    got = method.loss(batch, out, 0)

    def relations(x, r):  # concatenate heads, re-split into r heads, scaled dot products, causal softmax
        cat = torch.cat([x[:, i] for i in range(x.shape[1])], dim=-1)  # [B, T, h*d]
        dr = cat.shape[-1] // r
        rel = torch.stack([cat[..., j * dr:(j + 1) * dr] @ cat[..., j * dr:(j + 1) * dr].transpose(1, 2)
                           for j in range(r)], 1) / dr ** 0.5
        return torch.log_softmax(rel.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)

    # grouped-query K/V heads are not repeated: each dimension is in one relation head once
    for name, t, s in (("qq", tq, sq), ("kk", tk, sk), ("vv", tv, sv)):
        p, q = relations(t, 2), relations(s, 2)
        want = torch.nan_to_num(p.exp() * (p - q)).sum(-1).mean()
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)


def test_pkd_equals_the_patient_teacher_formula():
    g = torch.Generator().manual_seed(1)
    ctx = Context(teacher=teacher_info(layers=4), temperatures=[1.0], student_layers=2, student_hidden=32,
                  total_steps=1)
    method = PKD({"beta": 10.0, "alpha": 0.0, "strategy": "skip", "pooling": "mean"}, ctx)
    assert method.pairs == [(1, 2)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    t_h, s_h = torch.randn(B, T, 32, generator=g), torch.randn(B, T, 32, generator=g)
    logits = torch.randn(B, T, 11, generator=g)
    ids = logits.topk(3, -1).indices
    batch = Batch(input_ids=torch.randint(0, 11, (B, T), generator=g), mask=mask, topk_ids=ids,
                  topk_logprobs=torch.log_softmax(logits, -1).gather(-1, ids), logsumexp=torch.zeros(B, T, 1),
                  hidden={2: t_h})
    got = method.loss(batch, StudentOutput(logits=logits, hidden={1: s_h}), 0)["pt"]
    want = 0.0
    for b in range(B):
        n = int(mask[b].sum())
        s_vec, t_vec = s_h[b, :n].mean(0), t_h[b, :n].mean(0)
        want += ((s_vec / s_vec.norm() - t_vec / t_vec.norm()) ** 2).sum() / B
    torch.testing.assert_close(got, 10.0 * want, rtol=1e-5, atol=1e-6)
    per_token = PKD({"beta": 1.0, "alpha": 0.0, "pooling": "token"}, ctx)
    got = per_token.loss(batch, StudentOutput(logits=logits, hidden={1: s_h}), 0)["pt"]
    dist = ((s_h / s_h.norm(dim=-1, keepdim=True) - t_h / t_h.norm(dim=-1, keepdim=True)) ** 2).sum(-1)
    torch.testing.assert_close(got, dist[mask].mean(), rtol=1e-5, atol=1e-6)


def causal_softmax_log(scores):
    return torch.log_softmax(scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)


def test_tinybert_equals_its_layer_and_attention_formula():
    g = torch.Generator().manual_seed(2)
    ctx = Context(teacher=teacher_info(layers=4, hidden=16, heads=2, kv=2), temperatures=[1.0], student_layers=2,
                  student_hidden=16, total_steps=1, teacher_attention_scaling=0.5)
    method = TinyBERT({"alpha_pred": 0.0, "alpha_emb": 2.0}, ctx)
    assert method.pairs == [(1, 2), (2, 4)]
    hid = {layer: torch.randn(B, T, 16, generator=g) for layer in (0, 2, 4)}
    s_hid = {layer: torch.randn(B, T, 16, generator=g) for layer in (0, 1, 2)}
    fac = {layer: tuple(torch.randn(B, 2, T, 8, generator=g) for _ in range(3)) for layer in (2, 4)}
    s_fac = {layer: tuple(torch.randn(B, 2, T, 8, generator=g) for _ in range(3)) for layer in (1, 2)}
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), mask=torch.ones(B, T, dtype=torch.bool),
                  hidden=hid, factors=fac)
    got = method.loss(batch, StudentOutput(logits=torch.zeros(B, T, 11), hidden=s_hid, factors=s_fac, scaling=0.25), 0)

    def scores(q, k, scale):
        return (q @ k.transpose(-1, -2) * scale).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0)

    torch.testing.assert_close(got["emb"], 2.0 * ((s_hid[0] - hid[0]) ** 2).mean())
    torch.testing.assert_close(got["hid"], ((s_hid[1] - hid[2]) ** 2).mean() + ((s_hid[2] - hid[4]) ** 2).mean())
    want_att = sum(((scores(*s_fac[s][:2], 0.25) - scores(*fac[t][:2], 0.5)) ** 2).mean() for s, t in method.pairs)
    torch.testing.assert_close(got["att"], want_att)


def test_hidden_losses_compare_every_channel_at_the_teachers_scale(layer_cache, capsys):
    """A decoder's massive channel (RMS 20,000 here, as SmolLM2's ~23,000) is the whole raw MSE; at the default
    channel scale, with the same 10% error on every channel, each of the 16 channels has an equal share."""
    g = torch.Generator().manual_seed(5)
    ctx = Context(teacher=teacher_info(layers=4, hidden=16, heads=2, kv=2), temperatures=[1.0], student_layers=2,
                  student_hidden=16, total_steps=1, teacher_attention_scaling=0.5)
    scale = torch.ones(16)
    scale[0] = 20000.0
    ctx.hidden_scales = [{layer: scale for layer in (0, 2, 4)}]
    hid = {layer: torch.randn(B, T, 16, generator=g) * scale for layer in (0, 2, 4)}
    s_hid = {0: hid[0] * 1.1, 1: hid[2] * 1.1, 2: hid[4] * 1.1}
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), mask=torch.ones(B, T, dtype=torch.bool), hidden=hid)
    out = StudentOutput(logits=torch.zeros(B, T, 11), hidden=s_hid)
    for name, params in (("channel", {}), ("raw", {"scale": "raw"})):
        method = TinyBERT({"alpha_pred": 0.0, "alpha_att": 0.0, **params}, ctx)
        got = method.loss(batch, out, 0)["hid"]
        per_channel = sum((((s_hid[s] - hid[t]) / (scale if name == "channel" else 1)) ** 2).mean((0, 1))
                          for s, t in method.pairs)
        torch.testing.assert_close(got, per_channel.mean())
        share = float(per_channel[0] / per_channel.sum())
        assert (share < 0.2) if name == "channel" else (share > 0.99)

    # the scales come from the training sequences of the cache: each channel's RMS, float64
    from kdpipe.stage2_distill.data import Split, hidden_scales
    from kdpipe.storage.reader import TeacherCache

    cache = TeacherCache(layer_cache)
    split = Split.choose(cache, 8, 0)
    got = hidden_scales(cache, [2], split.train_units, sequences=8)
    per = cache.manifest.layout.sequences_per_unit
    rows = [r for u in sorted(split.train_units)[:2] for r in range(u * per, (u + 1) * per)]
    h = torch.from_numpy(cache.hidden(2, np.array(rows))).double()
    valid = torch.from_numpy(np.arange(cache.seq_len)[None] < cache.lengths(np.array(rows))[:, None])
    ms = (h[valid] ** 2).mean(0)
    torch.testing.assert_close(got[2].double(), (ms + 1e-6 * ms.mean()).sqrt(), rtol=1e-6, atol=0)

    # one term swamping another over the first steps is said, once, in one line
    from kdpipe.console import say
    from kdpipe.stage2_distill.trainer import warn_dominance

    warn_dominance([{"tinybert/hid": 1.4e4, "kd/kd": 2.0}] * 10, say)
    warn_dominance([{"tinybert/hid": 3.0, "kd/kd": 2.0}] * 10, say)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "tinybert/hid" in lines[0] and "7000x kd/kd" in lines[0]


def test_minilm_equals_attention_and_value_relation_kl():
    g = torch.Generator().manual_seed(3)
    ctx = Context(teacher=teacher_info(layers=3, hidden=16, heads=2, kv=2), temperatures=[1.0], student_layers=1,
                  student_hidden=16, total_steps=1, teacher_attention_scaling=0.35)
    t_f = tuple(torch.randn(B, 2, T, 8, generator=g) for _ in range(3))
    s_f = tuple(torch.randn(B, 2, T, 8, generator=g) for _ in range(3))
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), mask=torch.ones(B, T, dtype=torch.bool),
                  factors={3: t_f})
    got = MiniLM({}, ctx).loss(batch, StudentOutput(logits=torch.zeros(B, T, 11), factors={1: s_f}, scaling=0.2), 0)

    def kl(p_log, q_log):
        return torch.nan_to_num(p_log.exp() * (p_log - q_log)).sum(-1).mean()

    at = kl(causal_softmax_log(t_f[0] @ t_f[1].transpose(-1, -2) * 0.35),
            causal_softmax_log(s_f[0] @ s_f[1].transpose(-1, -2) * 0.2))
    vr = kl(causal_softmax_log(t_f[2] @ t_f[2].transpose(-1, -2) / 8 ** 0.5),
            causal_softmax_log(s_f[2] @ s_f[2].transpose(-1, -2) / 8 ** 0.5))
    torch.testing.assert_close(got["at"], at, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["vr"], vr, rtol=1e-5, atol=1e-6)
    # attention transfer alone, from stored probabilities: the same value
    probs = causal_softmax_log(t_f[0] @ t_f[1].transpose(-1, -2) * 0.35).exp()
    at_only = MiniLM({"alpha_vr": 0}, ctx)
    assert at_only.needs().attention == [3] and not at_only.needs().factors
    got = at_only.loss(Batch(input_ids=batch.input_ids, mask=batch.mask, attention={3: probs}),
                       StudentOutput(logits=torch.zeros(B, T, 11), factors={1: s_f}, scaling=0.2), 0)
    torch.testing.assert_close(got["at"], at, rtol=1e-5, atol=1e-6)


def test_mobilebert_alp_kd_and_rail_kd_equal_their_formulas():
    g = torch.Generator().manual_seed(4)
    ctx = Context(teacher=teacher_info(layers=4, hidden=16, heads=2, kv=2), temperatures=[1.0], student_layers=2,
                  student_hidden=16, total_steps=10, teacher_attention_scaling=0.3, cached_hidden=[0, 1, 2, 3, 4])
    hid = {layer: torch.randn(B, T, 16, generator=g) for layer in range(5)}
    s_hid = {layer: torch.randn(B, T, 16, generator=g) for layer in (1, 2)}
    s_fac = {layer: tuple(torch.randn(B, 2, T, 8, generator=g) for _ in range(3)) for layer in (1, 2)}
    t_probs = {t: causal_softmax_log(torch.randn(B, 2, T, T, generator=g)).exp() for t in (2, 4)}
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), mask=torch.ones(B, T, dtype=torch.bool),
                  hidden=hid, attention=t_probs)
    out = StudentOutput(logits=torch.zeros(B, T, 11), hidden=s_hid, factors=s_fac, scaling=0.25)

    mobile = MobileBERT({}, ctx)
    got = mobile.loss(batch, out, 0)
    fmt = sum(((s_hid[s] - hid[t]) ** 2).mean() for s, t in mobile.pairs)
    at = 0.0
    for s, t in mobile.pairs:
        p, q = t_probs[t], causal_softmax_log(s_fac[s][0] @ s_fac[s][1].transpose(-1, -2) * 0.25)
        at = at + torch.nan_to_num(p * (p.log() - q)).sum(-1).mean()
    torch.testing.assert_close(got["fmt"], fmt)
    torch.testing.assert_close(got["at"], at, rtol=1e-5, atol=1e-6)
    progressive = MobileBERT({"progressive": True}, ctx)
    assert [progressive.active_pairs(s) for s in (0, 4, 5, 9)] == [[(1, 2)], [(1, 2)], [(2, 4)], [(2, 4)]]

    alp = ALPKD({}, ctx)
    assert alp.teacher_layers == [1, 2, 3, 4] and alp.student_layers() == [1, 2]  # the final layers too
    t_vecs = torch.stack([hid[i].mean(1) for i in (1, 2, 3, 4)], 1)
    want = 0.0
    for j in (1, 2):
        s_vec = s_hid[j].mean(1)
        weights = torch.softmax(torch.einsum("blh,bh->bl", t_vecs, s_vec), -1)
        want = want + ((s_vec - torch.einsum("bl,blh->bh", weights, t_vecs)) ** 2).mean()
    torch.testing.assert_close(alp.loss(batch, out, 0)["alp"], want)

    rail = RAILKD({"redraw_every": 3, "seed": 7}, ctx)
    draws = [rail.drawn(step) for step in range(12)]
    assert draws == [RAILKD({"redraw_every": 3, "seed": 7}, ctx).drawn(step) for step in range(12)], "seeded"
    assert len({tuple(d) for d in draws}) > 1 and all(d[0] in (1, 2, 3) for d in draws)
    assert draws[0] == draws[2] and all(len(d) == 1 for d in draws)
    t_layer = draws[0][0]
    proj = rail.project[0]
    s_n = torch.nn.functional.normalize(proj(s_hid[1].mean(1)), dim=-1)
    t_n = torch.nn.functional.normalize(hid[t_layer].mean(1), dim=-1)
    torch.testing.assert_close(rail.loss(batch, out, 0)["rail"], ((s_n - t_n) ** 2).sum(-1).mean())


def test_ckd_equals_its_relation_formulas():
    g = torch.Generator().manual_seed(5)
    ctx = Context(teacher=teacher_info(layers=3, hidden=16), temperatures=[1.0], student_layers=3, student_hidden=8,
                  total_steps=1)
    method = CKD({"window": 3, "scale": "raw"}, ctx)  # the formula on states as given; scaling tested apart
    assert method.pairs == [(1, 1), (2, 2), (3, 3)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    hid = {t: torch.randn(B, T, 16, generator=g) for t in (1, 2, 3)}
    s_hid = {s: torch.randn(B, T, 8, generator=g) for s in (1, 2, 3)}
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), mask=mask, hidden=hid)
    got = method.loss(batch, StudentOutput(logits=torch.zeros(B, T, 11), hidden=s_hid), 0)

    def huber(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    def cos_angle(a, b):
        na, nb = a.norm(), b.norm()
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    def norm_dists(vectors):
        d = [[float((u - v).norm()) for v in vectors] for u in vectors]
        nonzero = [x for row in d for x in row if x > 0]
        mean = sum(nonzero) / len(nonzero)
        return [[x / mean for x in row] for row in d]

    wr_d = wr_a = ltr_d = ltr_a = 0.0
    n_wr_d = n_wr_a = n_ltr_d = n_ltr_a = 0
    for b in range(B):
        n = int(mask[b].sum())
        for layer in (1, 2, 3):
            tv, sv = hid[layer][b, :n], s_hid[layer][b, :n]
            td, sd = norm_dists(tv), norm_dists(sv)
            wr_d += sum(huber(sd[i][j], td[i][j]) for i in range(n) for j in range(n))
            n_wr_d += n * n
            for i in range(n):
                around = [min(max(i + o, 0), T - 1) for o in (-1, 0, 1)]
                for j in around:
                    for k in around:
                        if j < n and k < n:
                            ta = cos_angle(hid[layer][b, j] - hid[layer][b, i], hid[layer][b, k] - hid[layer][b, i])
                            sa = cos_angle(s_hid[layer][b, j] - s_hid[layer][b, i], s_hid[layer][b, k] - s_hid[layer][b, i])
                            wr_a += huber(sa, ta)
                            n_wr_a += 1
        for i in range(n):
            tv = [hid[layer][b, i] for layer in (1, 2, 3)]
            sv = [s_hid[layer][b, i] for layer in (1, 2, 3)]
            td, sd = norm_dists(tv), norm_dists(sv)
            ltr_d += sum(huber(sd[x][y], td[x][y]) for x in range(3) for y in range(3))
            n_ltr_d += 9
            for x in range(3):
                for y in range(3):
                    for z in range(3):
                        ltr_a += huber(cos_angle(sv[y] - sv[x], sv[z] - sv[x]), cos_angle(tv[y] - tv[x], tv[z] - tv[x]))
                        n_ltr_a += 1
    for name, want in (("wr_dist", wr_d / n_wr_d), ("wr_angle", wr_a / n_wr_a), ("ltr_dist", ltr_d / n_ltr_d),
                       ("ltr_angle", ltr_a / n_ltr_a)):
        torch.testing.assert_close(got[name].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("method,term", [("minilmv2", "minilmv2/qq"), ("pkd", "pkd/pt"), ("tinybert", "tinybert/hid"),
                                         ("minilm", "minilm/at"), ("mobilebert", "mobilebert/fmt"),
                                         ("alp_kd", "alp_kd/alp"), ("rail_kd:redraw_every=1000", "rail_kd/rail"),
                                         ("ckd", "ckd/wr_dist")])
def test_method_loss_falls_when_training_from_the_cache(method, term, layer_cache, tmp_path):
    distill(DistillConfig(cache=[str(layer_cache)], student="teacher:layers=2,hidden=16", out=str(tmp_path / "run"),
                          method=[method], steps=40, batch_size=4, lr=3e-3, eval_sequences=8, quiet=True))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    described = json.loads((tmp_path / "run" / "run.json").read_text())["methods"][0]
    assert described.startswith(method.split(":")[0]) and "teacher" in described
    first, last = np.mean([x[term] for x in lines[:5]]), np.mean([x[term] for x in lines[-5:]])
    assert np.isfinite(first) and np.isfinite(last)
    assert last < 0.8 * first, (first, last)


def test_mobilebert_trains_from_attention_probs_too(corpus, tmp_path):
    """Attention-distribution methods read either cached form: here stored probabilities."""
    teacher = save_teacher(tmp_path / "teacher", "llama", sharpness=30)
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(tmp_path / "c"), seq_len=32, top_k=8,
                          hidden_layers="all", attention_layers="all", attention_form="probs", sequences_per_unit=4,
                          quiet=True))
    distill(DistillConfig(cache=[str(tmp_path / "c")], student="teacher:layers=2,hidden=16", out=str(tmp_path / "r"),
                          method=["mobilebert:alpha_fmt=0"], steps=30, batch_size=4, lr=3e-3, eval_sequences=8,
                          quiet=True))
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][1:]
    assert np.mean([x["mobilebert/at"] for x in lines[-5:]]) < 0.8 * np.mean([x["mobilebert/at"] for x in lines[:5]])
    # MiniLM's attention transfer alone reads distributions too, and equals its value from the factors form
    distill(DistillConfig(cache=[str(tmp_path / "c")], student="teacher:layers=2,hidden=16", out=str(tmp_path / "m"),
                          method=["minilm:alpha_vr=0"], steps=30, batch_size=4, lr=3e-3, eval_sequences=8, quiet=True))
    lines = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()][1:]
    assert np.mean([x["minilm/at"] for x in lines[-5:]]) < 0.8 * np.mean([x["minilm/at"] for x in lines[:5]])


def test_missing_attention_factors_name_the_extract_flags(corpus, tmp_path):
    teacher = save_teacher(tmp_path / "teacher", "llama")
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(tmp_path / "c"), seq_len=32, top_k=8,
                          sequences_per_unit=4, attention_layers="1", attention_form="probs", quiet=True))
    # one attention form per cache: the probs of block 1 make way for the factors of block 3
    with pytest.raises(UserError, match="--attention-layers 3 --attention-form factors"):
        distill(DistillConfig(cache=[str(tmp_path / "c")], student="teacher:layers=1", out=str(tmp_path / "r"),
                              method=["minilmv2"], steps=1, quiet=True))


def test_methods_combine_tinybert_minilmv2_kd(layer_cache, tmp_path):
    """GKD's `mixbaseline`: several methods, one run, one weighted loss; every term is logged."""
    distill(DistillConfig(cache=[str(layer_cache)], student="teacher:layers=2,hidden=16", out=str(tmp_path / "run"),
                          method=["tinybert:alpha_pred=0", "minilmv2:weight=0.5", "kd:temperature=2"], steps=30,
                          batch_size=4, lr=3e-3, eval_sequences=8, quiet=True))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = lines[1]
    assert {"tinybert/hid", "tinybert/att", "tinybert/emb", "minilmv2/qq", "kd/kd"} <= set(step)
    assert step["loss"] == pytest.approx(sum(v for k, v in step.items() if "/" in k and not k.startswith("eval")))
    assert lines[-1]["eval/kl_teacher"] < lines[0]["eval/kl_teacher"]


def test_extract_for_methods_chooses_the_layers_they_need(teachers, corpus, tmp_path):
    from test_cli import kdpipe

    result = kdpipe("extract", "--teacher", teachers["llama"], "--data", corpus, "--out", tmp_path / "c",
                    "--seq-len", "32", "--top-k", "8", "--sequences-per-unit", "4", "--quiet",
                    "--for-methods", "tinybert,minilmv2,pkd", "--student-layers", "2")
    assert result.exit_code == 0, result.output
    signals = json.loads(kdpipe("inspect", tmp_path / "c", "--json").stdout)["manifest"]["signals"]
    # tinybert: embeddings + uniform map 1->2 (round(1.5)), 2->3; minilmv2: last block; pkd (skip): 1->1
    assert signals["hidden_layers"] == [0, 1, 2, 3]
    assert signals["attention_layers"] == [2, 3] and signals["attention_form"] == "factors"
    assert signals["temperatures"] == [1.0, 2.0]
    run = distill(DistillConfig(cache=[str(tmp_path / "c")], student="teacher:layers=2", out=str(tmp_path / "r"),
                                method=["tinybert", "minilmv2", "pkd"], steps=2, batch_size=4, eval_sequences=0,
                                quiet=True))
    assert run.steps == 2
    missing = kdpipe("extract", "--teacher", teachers["llama"], "--data", corpus, "--out", tmp_path / "d",
                     "--for-methods", "tinybert")
    assert missing.exit_code == 2 and "--student-layers" in missing.stderr


def test_intermediate_layer_methods_weigh_a_tenth_by_default_and_the_user_decides():
    """Layer methods are auxiliaries to an output loss (0.1), output losses count fully (1); weight= overrides."""
    from kdpipe.stage2_distill.methods import METHODS
    from kdpipe.stage2_distill.methods.base import checked_params

    layer = {"tinybert", "minilm", "minilmv2", "mobilebert", "pkd", "sid", "alp_kd", "ckd", "universal_kd",
             "rail_kd", "mgskd", "lrc_bert"}
    assert {name for name, cls in METHODS.items() if cls.default_weight == 0.1} == layer
    assert all(METHODS[name].default_weight == 1.0 for name in ("kd", "lm", "distilbert", "diito", "theseus"))
    ctx = Context(teacher=teacher_info(), temperatures=[1.0], student_layers=2, student_hidden=32, total_steps=10,
                  cached_hidden=[1, 2, 3, 4], teacher_attention_scaling=0.5)
    assert PKD({}, ctx).weight == 0.1 and PKD({"weight": 2.0}, ctx).weight == 2.0
    with pytest.raises(UserError, match="weight"):
        checked_params(PKD, {"weight": -1.0})
