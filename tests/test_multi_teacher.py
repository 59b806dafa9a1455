"""Several teachers: caches over the same token ids drive TMKD, MT-BERT, RL-KD, Uncertainty and DGKD;
each loss against a direct computation (with k = V, where the bucket KL is the full KL), and a few
dozen steps from two tiny teachers' caches in which each method's loss falls."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.errors import UserError
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.losses import teacher_label_nll
from kdpipe.stage2_distill.methods import Batch, Context, StudentOutput
from kdpipe.stage2_distill.methods.dgkd import DGKD
from kdpipe.stage2_distill.methods.mt_bert import MTBERT
from kdpipe.stage2_distill.methods.rl_kd import RLKD
from kdpipe.stage2_distill.methods.tmkd import TMKD
from kdpipe.stage2_distill.methods.uncertainty import Uncertainty, normalized_entropy
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from test_layer_methods import teacher_info
from tiny import save_teacher

B, T, V = 3, 5, 11


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_batch(logits, ids, hidden=None) -> Batch:
    """A batch whose 'top-k' is the whole vocabulary (k = V)."""
    logp = torch.log_softmax(logits, -1)
    values, order = logp.sort(-1, descending=True)
    return Batch(input_ids=ids, mask=torch.ones(ids.shape, dtype=torch.bool), topk_ids=order, topk_logprobs=values,
                 logsumexp=torch.logsumexp(logits, -1, keepdim=True), hidden=hidden or {})


def kl_per_sequence(t_logits, s_logits):
    p, q = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean(-1)


def two_teachers(student_layers=2, student_hidden=16):
    infos = [teacher_info(layers=3, hidden=32), teacher_info(layers=2, hidden=24, heads=4, kv=2)]
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    t_logits = [randn(B, T, V, seed=10 + i) * 2 for i in range(2)]
    hidden = [{2: randn(B, T, 32, seed=19), 3: randn(B, T, 32, seed=20)},
              {1: randn(B, T, 24, seed=21), 2: randn(B, T, 24, seed=22)}]
    batch = full_batch(t_logits[0], ids, hidden[0])
    batch.others = [full_batch(t_logits[1], ids, hidden[1])]
    ctx = Context(teacher=infos[0], temperatures=[1.0], student_layers=student_layers, student_hidden=student_hidden,
                  total_steps=10, teachers=infos, teacher_hidden=[[0, 3], [1, 2]], teacher_temperatures=[[1.0], [1.0]])
    return ctx, batch, t_logits, ids


def test_teacher_label_nll_is_exact_within_the_topk_and_bounded_outside():
    logits, ids = randn(B, T, V, seed=2), torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    b = full_batch(logits, ids)
    want = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)
    torch.testing.assert_close(teacher_label_nll(b.topk_ids, b.topk_logprobs, ids, b.mask), want)
    k3 = teacher_label_nll(b.topk_ids[..., :3], b.topk_logprobs[..., :3], ids, b.mask)
    assert (k3 <= want + 1e-5).all()  # outside the top-k, -log(tail mass) bounds the true NLL from below


def test_tmkd_mt_bert_uncertainty_dgkd_equal_their_formulas():
    ctx, batch, t_logits, ids = two_teachers()
    s_logits, h_final = randn(B, T, V, seed=30), randn(B, T, 16, seed=31)
    s_hidden = {1: randn(B, T, 16, seed=32), 2: h_final}
    out = StudentOutput(logits=s_logits, hidden=s_hidden)
    kl = [kl_per_sequence(t, s_logits) for t in t_logits]

    tmkd = TMKD({}, ctx)
    got = tmkd.loss(batch, out, 0)
    torch.testing.assert_close(got["own"], (kl[0].mean() + kl[1].mean()) / 2, rtol=1e-5, atol=1e-6)
    heads = [kl_per_sequence(t, h_final @ tmkd.heads[i].weight.T).mean() for i, t in enumerate(t_logits)]
    torch.testing.assert_close(got["heads"], sum(heads) / 2, rtol=1e-5, atol=1e-6)

    mt = MTBERT({"alpha_hard": 0.0}, ctx)
    assert mt.teacher_needs(0).hidden == [2, 3] and mt.teacher_needs(1).hidden == [1, 2]
    got = mt.loss(batch, out, 0)
    ce = [-torch.log_softmax(t, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1) for t in t_logits]
    torch.testing.assert_close(got["soft"], sum((k / (1 + c)).mean() for k, c in zip(kl, ce)), rtol=1e-5, atol=1e-6)
    fit = sum(F.mse_loss(mt.fit[i](s_hidden[s]), batch.teacher(i).hidden[t])
              for i, pairs in enumerate(mt.pairs) for s, t in pairs)
    torch.testing.assert_close(got["hidden"], fit, rtol=1e-5, atol=1e-6)

    unc = Uncertainty({}, ctx)
    assert unc.order == [1, 0]  # 24x2 is smaller than 32x3
    u = normalized_entropy(s_logits, batch.mask)
    p = torch.log_softmax(s_logits, -1)
    torch.testing.assert_close(u, (-(p.exp() * p).sum(-1) / math.log(V)).mean(-1))
    w_small, w_large = u, 1 - u  # n = 2: w_j = u + (1 - 2u) j, normalized (they sum to 1)
    want = (w_large * kl[0]).mean() + (w_small * kl[1]).mean()  # a convex combination: no extra 1/n
    torch.testing.assert_close(unc.loss(batch, out, 0)["kd"], want, rtol=1e-5, atol=1e-6)
    same = Batch(**{**batch.__dict__, "others": [batch]})  # two teachers that agree cost what one does
    torch.testing.assert_close(unc.loss(same, out, 0)["kd"], kl[0].mean(), rtol=1e-5, atol=1e-6)

    dg = DGKD({"drop_rate": 0.5, "seed": 3}, ctx)
    draws = [dg.kept(s) for s in range(50)]
    assert draws == [DGKD({"drop_rate": 0.5, "seed": 3}, ctx).kept(s) for s in range(50)]  # seeded, reproducible
    assert all(d for d in draws) and {tuple(d) for d in draws} == {(0,), (1,), (0, 1)}
    assert draws != [DGKD({"drop_rate": 0.5, "seed": 4}, ctx).kept(s) for s in range(50)]
    for step in range(4):
        kept = dg.kept(step)
        torch.testing.assert_close(dg.loss(batch, out, step)["soft"], sum(kl[i].mean() for i in kept) / len(kept),
                                   rtol=1e-5, atol=1e-6)


def topk_batch(logits: torch.Tensor, ids: torch.Tensor, k: int, temps=(1.0, 2.0)) -> Batch:
    """What a cache of k < V at `temps` holds for these teacher logits, tail mass included."""
    logp = torch.log_softmax(logits, -1)
    values, top = logp.topk(k, -1)
    lse = torch.stack([torch.logsumexp(logits / t, -1) for t in temps], -1)
    tails = torch.stack([torch.log_softmax(logits / t, -1).scatter(-1, top, float("-inf")).logsumexp(-1)
                         for t in temps], -1)
    return Batch(input_ids=ids, mask=torch.ones(ids.shape, dtype=torch.bool), topk_ids=top, topk_logprobs=values,
                 logsumexp=lse, logtail=tails)


def bucket_kl_per_sequence(t_logits, s_logits, k, temperature):
    """T^2 times the (k+1)-bucket KL at T, in float64, per sequence."""
    p, q = (torch.log_softmax(x.double() / temperature, -1) for x in (t_logits, s_logits))
    top = t_logits.topk(k, -1).indices
    buckets = [torch.cat([x.gather(-1, top), x.scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)], -1)
               for x in (p, q)]
    return temperature ** 2 * (buckets[0].exp() * (buckets[0] - buckets[1])).sum(-1).mean(-1)


def test_multi_teacher_methods_with_k_below_the_vocabulary_and_t_2():
    """k = 4 of V = 11, T = 2: each method's per-teacher term is T^2 times the bucket KL at T=2 (float64)."""
    ctx, full, t_logits, ids = two_teachers()
    ctx.temperatures, ctx.teacher_temperatures = [1.0, 2.0], [[1.0, 2.0], [1.0, 2.0]]
    batch = topk_batch(t_logits[0], ids, 4)
    batch.others = [topk_batch(t_logits[1], ids, 4)]
    batch.hidden, batch.others[0].hidden = full.hidden, full.others[0].hidden
    s_logits = randn(B, T, V, seed=30)
    out = StudentOutput(logits=s_logits, hidden={1: randn(B, T, 16, seed=32), 2: randn(B, T, 16, seed=31)})
    kl = [bucket_kl_per_sequence(t, s_logits, 4, 2.0).float() for t in t_logits]
    got = TMKD({"temperature": 2}, ctx).loss(batch, out, 0)
    torch.testing.assert_close(got["own"], (kl[0].mean() + kl[1].mean()) / 2, rtol=1e-4, atol=1e-6)
    unc = Uncertainty({"temperature": 2}, ctx)
    u = normalized_entropy(s_logits, batch.mask)
    torch.testing.assert_close(unc.loss(batch, out, 0)["kd"], ((1 - u) * kl[0]).mean() + (u * kl[1]).mean(),
                               rtol=1e-4, atol=1e-6)
    dg = DGKD({"temperature": 2, "drop_rate": 0.0}, ctx)
    torch.testing.assert_close(dg.loss(batch, out, 0)["soft"], (kl[0].mean() + kl[1].mean()) / 2, rtol=1e-4, atol=1e-6)
    # MT-BERT's per-example weight: the teacher's NLL on the data, exact where the label is in the top-k and
    # -log(stored tail mass) elsewhere
    mt = MTBERT({"temperature": 2, "alpha_hard": 0.0, "alpha_hidden": 0.0}, ctx)
    nll = []
    for i, t in enumerate(t_logits):
        logp = torch.log_softmax(t, -1)[:, :-1]
        label, top = ids[:, 1:, None], logp.topk(4, -1).indices
        tail = logp.scatter(-1, top, float("-inf")).logsumexp(-1)
        nll.append(-torch.where((top == label).any(-1), logp.gather(-1, label).squeeze(-1), tail).mean(-1))
        b = batch.teacher(i)
        torch.testing.assert_close(teacher_label_nll(b.topk_ids, b.topk_logprobs, ids, b.mask, b.logtail[..., 0]),
                                   nll[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mt.loss(batch, out, 0)["soft"], sum((k / (1 + n)).mean() for k, n in zip(kl, nll)),
                               rtol=1e-4, atol=1e-6)


def test_rl_kd_selects_by_a_seeded_policy_and_rewards_each_example_by_its_own_improvement():
    ctx, batch, t_logits, ids = two_teachers()
    method = RLKD({"seed": 1}, ctx)
    assert method.state_layers == [3, 2]
    state = method.state(batch)
    assert state.shape == (B, 3 + 32 + 3 + 24)
    weight = torch.nn.Parameter(torch.ones(()))  # a stand-in student: logits scaled by one weight
    base = randn(B, T, V, seed=30)
    run = lambda input_ids, mask, edits, hidden_layers=(): (base * weight, {})  # noqa: E731
    first = method.loss(batch, StudentOutput(logits=base * weight, run=run), 0)
    second = method.loss(batch, StudentOutput(logits=base * weight, run=run), 0)  # the step's 2nd micro-batch
    assert first["policy"] == 0 and second["policy"] == 0  # no update has happened yet
    a1, a2 = (p.action for p in method._pending)
    kl = torch.stack([kl_per_sequence(t, base) for t in t_logits], -1)
    torch.testing.assert_close(second["kd"], ((kl * a2).sum(-1) / a2.sum(-1).clamp_min(1)).mean())
    replay = RLKD({"seed": 1}, ctx)
    replay.load_state_dict(method.state_dict())
    replay.loss(batch, StudentOutput(logits=base, run=run), 0)
    assert torch.equal(replay._pending[0].action, a1)  # same seed, step, micro-batch and policy: same selections
    with torch.no_grad():
        weight.fill_(0.5)  # "the optimizer step"
    third = method.loss(batch, StudentOutput(logits=base * weight, run=run), 1)
    # each pending micro-batch's reward is its own examples' LM loss before minus after the update
    lm = lambda x: -torch.log_softmax(x, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)  # noqa: E731
    torch.testing.assert_close(method.last_reward, lm(base) - lm(base * 0.5))
    assert third["policy"].requires_grad and len(method._pending) == 1
    third["policy"].backward()
    assert method.policy.weight.grad.abs().sum() > 0


def oracle_batch(input_ids: torch.Tensor, target: torch.Tensor, vocab: int, k: int = 4) -> Batch:
    """A teacher that puts ~0.9 on `target` at every position (top-k of k < V, its tail stored)."""
    logits = torch.zeros(*target.shape, vocab).scatter_(-1, target[..., None], 5.0)
    logp = torch.log_softmax(logits, -1)
    values, top = logp.topk(k, -1)
    tail = logp.scatter(-1, top, float("-inf")).logsumexp(-1)
    return Batch(input_ids=input_ids, mask=torch.ones(target.shape, dtype=torch.bool), topk_ids=top,
                 topk_logprobs=values, logsumexp=torch.logsumexp(logits, -1, keepdim=True), logtail=tail[..., None])


@pytest.mark.parametrize("good", [0, 1])
def test_rl_kd_learns_to_prefer_the_teacher_that_is_better(good):
    """Two teachers over the same tokens: one predicts the true next token, the other a wrong one. A tiny
    student trained with rl_kd, two micro-batches per step, ends with the policy choosing the right one
    (whichever --cache it is) and leaving the wrong one."""
    from tiny import make_model

    vocab, b, t = 24, 8, 16
    student = make_model("llama", vocab, layers=1, hidden=16, heads=2, seed=0)
    info = teacher_info(layers=2, hidden=16)
    ctx = Context(teacher=info, temperatures=[1.0], student_layers=1, student_hidden=16, total_steps=60,
                  teachers=[info, info], teacher_hidden=[[], []], teacher_temperatures=[[1.0], [1.0]])
    method = RLKD({}, ctx)
    opt = torch.optim.AdamW([*student.parameters(), *method.parameters()], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    run = lambda input_ids, mask, edits, hidden_layers=(): (student(input_ids=input_ids).logits, {})  # noqa: E731
    for step in range(60):
        for _ in range(2):
            ids = torch.randint(0, vocab, (b, t), generator=g)
            right = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            wrong = (right + 1 + torch.randint(0, vocab - 1, right.shape, generator=g)) % vocab
            pair = [oracle_batch(ids, right, vocab), oracle_batch(ids, wrong, vocab)]
            batch = pair[good]
            batch.others = [pair[1 - good]]
            terms = method.loss(batch, StudentOutput(logits=student(input_ids=ids).logits, run=run), step)
            (sum(terms.values()) / 2).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        chosen = torch.sigmoid(method.policy(method.state(batch))).mean(0)
    assert chosen[good] > 0.7 and chosen[1 - good] < 0.3, chosen


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("multi")
    shapes = {"big": dict(layers=3, hidden=32, seed=0), "small": dict(layers=2, hidden=24, seed=1)}
    for name, shape in shapes.items():
        teacher = save_teacher(root / name, "llama", sharpness=30, **shape)
        extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(root / f"{name}.cache"), seq_len=32,
                              top_k=16, hidden_layers="all", sequences_per_unit=4 if name == "big" else 8,
                              quiet=True))
    return root


@pytest.mark.parametrize("method,term", [("tmkd", "tmkd/heads"), ("mt_bert:alpha_hard=0", "mt_bert/hidden"),
                                         ("rl_kd", "eval/kl_teacher"), ("uncertainty", "uncertainty/kd"),
                                         ("dgkd", "dgkd/soft")])
def test_multi_teacher_loss_falls_training_from_two_caches(method, term, two_caches, tmp_path):
    distill(DistillConfig(cache=[str(two_caches / "big.cache"), str(two_caches / "small.cache")],
                          student="teacher:layers=2,hidden=16", out=str(tmp_path / "run"), method=[method],
                          steps=80 if method == "rl_kd" else 40,
                          batch_size=4, lr=1e-2, eval_sequences=8, quiet=True))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if term.startswith("eval/"):  # RL-KD's own soft loss depends on which teachers the policy picked
        first, last = lines[0][term], lines[-1][term]
    else:
        first, last = np.mean([x[term] for x in lines[1:6]]), np.mean([x[term] for x in lines[-5:]])
    assert math.isfinite(first) and last < 0.8 * first, (first, last)


def test_caches_over_other_data_or_no_multi_teacher_method_are_refused(two_caches, corpus, tmp_path):
    other = tmp_path / "other.cache"
    extract(ExtractConfig(teacher=str(two_caches / "small"), data=[str(corpus)], out=str(other), seq_len=16,
                          top_k=16, sequences_per_unit=4, quiet=True))
    with pytest.raises(UserError, match=r"caches .*big.cache \(data fingerprint [0-9a-f]{16}\) and .*other.cache "
                                        r"\([0-9a-f]{16}\) hold different token ids"):
        distill(DistillConfig(cache=[str(two_caches / "big.cache"), str(other)], student="teacher:layers=2",
                              out=str(tmp_path / "r"), method=["tmkd"], steps=1, quiet=True))
    with pytest.raises(UserError, match="no chosen method reads more than one teacher"):
        distill(DistillConfig(cache=[str(two_caches / "big.cache"), str(two_caches / "small.cache")],
                              student="teacher:layers=2", out=str(tmp_path / "r2"), method=["kd"], steps=1, quiet=True))
