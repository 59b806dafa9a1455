"""Each logit loss against its full-vocabulary reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdpipe.stage2_distill.losses import (bucket_kl, inclusion_weights, lm_loss, renormalized_topk_kl,
                                          sampled_cross_entropy, sampled_inclusion_cross_entropy, sampled_log_norm,
                                          teacher_logprobs, topk_logit_mse)
from kdpipe.storage.codecs import dequantize_logprobs, quantize_logprobs

V = 50


def teacher_cache_view(t_logits: torch.Tensor, k: int, temperatures=(1.0, 2.0)):
    """What the cache stores for these teacher logits: top-k ids, log-probs at T=1, logsumexp per T."""
    lse = torch.stack([torch.logsumexp(t_logits / t, -1) for t in temperatures], -1)
    values, ids = t_logits.topk(k, -1)
    return ids, values - lse[..., :1], lse


def full_kl(t_logits, s_logits, temperature):
    p = F.log_softmax(t_logits / temperature, -1)
    q = F.log_softmax(s_logits / temperature, -1)
    return (p.exp() * (p - q)).sum(-1).mean()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 7, V, generator=g) * 3
    s = torch.randn(3, 7, V, generator=g) * 2
    return t, s


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_and_renormalized_kl_equal_full_kl_when_k_is_the_vocabulary(logits, temperature):
    t, s = logits
    ids, logp1, lse = teacher_cache_view(t, V)
    t_logp = teacher_logprobs(logp1, lse[..., 0], lse[..., 1 if temperature == 2.0 else 0], temperature)
    torch.testing.assert_close(t_logp.exp().sum(-1), torch.ones(3, 7), rtol=0, atol=1e-5)
    want = full_kl(t, s, temperature)
    torch.testing.assert_close(bucket_kl(s, ids, t_logp, temperature), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(renormalized_topk_kl(s, ids, t_logp, temperature), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 20, 49])
def test_bucket_kl_is_a_lower_bound_of_the_full_kl(logits, k):
    t, s = logits
    ids, logp1, _ = teacher_cache_view(t, k)
    for b in range(3):
        for pos in range(7):
            got = bucket_kl(s[b:b + 1, pos:pos + 1], ids[b:b + 1, pos:pos + 1], logp1[b:b + 1, pos:pos + 1])
            assert 0 <= got <= full_kl(t[b, pos], s[b, pos], 1.0) * (1 + 1e-5)  # equal at k = V - 1


def test_bucket_kl_matches_the_direct_k_plus_one_bucket_formula(logits):
    t, s = logits
    k = 6
    ids, logp1, _ = teacher_cache_view(t, k)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    p_buckets = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_buckets = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    want = (p_buckets * (p_buckets.log() - q_buckets.log())).sum(-1).mean()
    torch.testing.assert_close(bucket_kl(s, ids, logp1), want, rtol=1e-4, atol=1e-6)
    # the renormalized KL differs: it drops the tail
    assert abs(renormalized_topk_kl(s, ids, logp1) - want) > 1e-3


def test_masked_positions_do_not_count(logits):
    t, s = logits
    ids, logp1, _ = teacher_cache_view(t, 8)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, :3] = True
    torch.testing.assert_close(bucket_kl(s, ids, logp1, mask=mask), bucket_kl(s[:1, :3], ids[:1, :3], logp1[:1, :3]))


def test_sampled_cross_entropy_is_unbiased(logits):
    t, s = logits
    t, s = t[:1, :2], s[:1, :2]
    p = F.softmax(t, -1)
    full_ce = -(p * F.log_softmax(s, -1)).sum(-1).mean()
    g = torch.Generator().manual_seed(1)
    m, trials, estimates = 8, 3000, []
    for _ in range(trials):
        draws = torch.multinomial(p.view(-1, V), m, replacement=True, generator=g)
        counts = torch.zeros(2, V).scatter_add_(1, draws, torch.ones(2, m))
        c, ids = counts.topk(m, -1)
        estimates.append(sampled_cross_entropy(s, ids.view(1, 2, m), c.view(1, 2, m)))
    est = torch.stack(estimates)
    # the mean over draws matches the full cross-entropy within 4 standard errors
    assert abs(est.mean() - full_ce) < 4 * est.std() / trials ** 0.5
    assert est.std() > 0.01  # it is an estimate, not the exact value


def test_topk_logit_mse_and_lm_loss_match_direct_computations(logits):
    t, s = logits
    ids, _, _ = teacher_cache_view(t, V)
    torch.testing.assert_close(topk_logit_mse(s, ids, t.gather(-1, ids)), ((s - t) ** 2).mean())
    input_ids = torch.randint(0, V, (3, 7))
    want = F.cross_entropy(s[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(s, input_ids), want)


def with_tail(logits: torch.Tensor, ids: torch.Tensor, tail: float) -> torch.Tensor:
    """The same logits with everything outside `ids` shifted so that the mass outside is `tail` (at T=1)."""
    top, rest = logits.gather(-1, ids).logsumexp(-1), logits.scatter(-1, ids, float("-inf")).logsumexp(-1)
    shift = top + math.log(tail) - math.log1p(-tail) - rest
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, ids, False)
    return torch.where(outside, logits + shift[..., None], logits)


def bucket_kl_float64(s: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor, t_logtail: torch.Tensor, temperature):
    logq = F.log_softmax(s / temperature, -1)
    s_tail = logq.scatter(-1, ids, float("-inf")).logsumexp(-1)
    kl = (t_logp.exp() * (t_logp - logq.gather(-1, ids))).sum(-1) + t_logtail.exp() * (t_logtail - s_tail)
    return kl.mean()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))  # no eps: these gradients can be ~1e-13


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", [0.5, 1e-3, 1e-6, 1e-9, 1e-12])
def test_bucket_kl_and_its_gradient_match_float64_down_to_tiny_tails(tail, temperature):
    """V=4096, k=64; teacher tail `tail`, student tails 3x above and 3x below it. The loss and its gradient in
    float32 against float64 on the same inputs, and the gradient on the tail tokens alone (what
    log(1 - sum q_topk) lost below ~1e-7, and what a teacher tail recovered from float32 top-k gets backwards)."""
    g = torch.Generator().manual_seed(0)
    vocab, k = 4096, 64
    t = torch.randn(16, vocab, generator=g, dtype=torch.float64) * 2
    ids = t.topk(k, -1).indices
    t = with_tail(t, ids, tail)
    t_logq = F.log_softmax(t / temperature, -1)
    t_logp = t_logq.gather(-1, ids).float().double()  # what the cache holds, as the float32 path receives it
    t_logtail = t_logq.scatter(-1, ids, float("-inf")).logsumexp(-1).float().double()
    outside = torch.ones_like(t, dtype=torch.bool).scatter(-1, ids, False)
    for factor in (3.0, 1 / 3):
        s = with_tail(t + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64), ids, min(0.6, tail * factor))
        s = s.float().double()
        s64 = s.clone().requires_grad_(True)
        want = bucket_kl_float64(s64, ids, t_logp, t_logtail, temperature)
        g64, = torch.autograd.grad(want, s64)
        s32 = s.float().requires_grad_(True)
        got = bucket_kl(s32, ids, t_logp.float(), temperature, t_logtail=t_logtail.float())
        g32, = torch.autograd.grad(got, s32)
        assert abs(got.item() - want.item()) <= 1e-3 * want.item()
        assert cosine(g32, g64) >= 0.999
        assert cosine(g32[outside], g64[outside]) >= 0.999


def test_sampled_cross_entropy_at_another_temperature_is_within_two_percent_with_2048_draws(logits):
    """Draws at T=1, the loss at T=2 (and at T=1): importance-weighted by the teacher's T=1 log-probabilities
    of the drawn ids, the estimate over 64 positions is within 2% of the exact H(p_T, q_T), with the exact
    normalizer (unbiased) and self-normalized."""
    g = torch.Generator().manual_seed(2)
    vocab, m = 512, 2048
    t = torch.randn(1, 64, vocab, generator=g) * 3
    s = torch.randn(1, 64, vocab, generator=g) * 2
    temps = [1.0, 2.0]
    lse = torch.stack([torch.logsumexp(t / x, -1) for x in temps], -1)
    draws = torch.multinomial(F.softmax(t, -1).view(-1, vocab), m, replacement=True, generator=g)
    counts = torch.zeros(64, vocab).scatter_add_(1, draws, torch.ones(64, m))
    c, ids = counts.topk(m if m < vocab else vocab, -1)
    c, ids = c.view(1, 64, -1), ids.view(1, 64, -1)
    t_logp = F.log_softmax(t, -1).gather(-1, ids)
    stored = torch.from_numpy(dequantize_logprobs(quantize_logprobs(t_logp.numpy())))  # as the cache holds them
    for temperature in temps:
        exact = -(F.softmax(t / temperature, -1) * F.log_softmax(s / temperature, -1)).sum(-1).mean()
        log_norm = sampled_log_norm(lse, temperature, 1.0, temps)
        for norm in (log_norm, None):
            for logp in (t_logp, stored):
                est = sampled_cross_entropy(s, ids, c, temperature, t_logp=logp, log_norm=norm)
                assert abs(est - exact) <= 0.02 * exact
    # the property the weights exist for: the teacher itself is where the T=2 loss is stationary, up to the
    # draws' noise; the frequencies alone (the T=1 target, what the loss used before) pull away from it
    def grad_at_teacher(loss):
        x = t.clone().requires_grad_(True)
        return torch.autograd.grad(loss(x), x)[0].norm()

    weighted = grad_at_teacher(lambda x: sampled_cross_entropy(x, ids, c, 2.0, t_logp=t_logp,
                                                               log_norm=sampled_log_norm(lse, 2.0, 1.0, temps)))
    frequencies = grad_at_teacher(lambda x: -(c / m * F.log_softmax(x / 2, -1).gather(-1, ids)).sum(-1).mean())
    assert weighted < 0.3 * frequencies
    with pytest.raises(ValueError, match="t_logp"):
        sampled_cross_entropy(s, ids, c, 2.0)


def test_importance_weighted_sampled_cross_entropy_is_unbiased(logits):
    """With the exact normalizer the estimate at T=2 from T=1 draws is unbiased even with m = 8 draws."""
    t, s = logits
    t, s = t[:1, :2], s[:1, :2]
    lse = torch.stack([torch.logsumexp(t / x, -1) for x in (1.0, 2.0)], -1)
    exact = -(F.softmax(t / 2, -1) * F.log_softmax(s / 2, -1)).sum(-1).mean()
    g = torch.Generator().manual_seed(3)
    m, trials, estimates = 8, 3000, []
    for _ in range(trials):
        draws = torch.multinomial(F.softmax(t, -1).view(-1, V), m, replacement=True, generator=g)
        counts = torch.zeros(2, V).scatter_add_(1, draws, torch.ones(2, m))
        c, ids = counts.topk(m, -1)
        ids, c = ids.view(1, 2, m), c.view(1, 2, m)
        t_logp = F.log_softmax(t, -1).gather(-1, ids)
        estimates.append(sampled_cross_entropy(s, ids, c, 2.0, t_logp=t_logp,
                                               log_norm=sampled_log_norm(lse, 2.0, 1.0, [1.0, 2.0])))
    est = torch.stack(estimates)
    assert abs(est.mean() - exact) < 4 * est.std() / trials ** 0.5


def _enumerate_draws(p: torch.Tensor, m: int):
    """Every sequence of m draws with replacement from p [V], with its probability: (probability, distinct ids
    by count with their counts, padded with count 0 to m slots)."""
    import itertools

    for seq in itertools.product(range(len(p)), repeat=m):
        prob = math.prod(p[i].item() for i in seq)
        counts = torch.zeros(len(p)).scatter_add_(0, torch.tensor(seq), torch.ones(m))
        c, ids = counts.topk(m)
        yield prob, torch.where(c > 0, ids, 0), c


@pytest.mark.parametrize("temperature,sample_temperature", [(1.0, 1.0), (2.0, 1.0), (1.0, 2.0)])
def test_inclusion_weights_are_unbiased_and_exact_on_the_head_by_enumeration(temperature, sample_temperature):
    """Over every outcome of m = 3 draws from a peaked teacher (p_0 = 0.9), the expected Horvitz-Thompson weight of
    each token is its probability at T (to float32), and the head's weight varies far less than the counts'
    frequency c_0 / m does; at T != T_s the logsumexps reweight p_T / P(drawn at T_s), still unbiased."""
    logits = torch.tensor([4.0, 1.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    temps = sorted({1.0, temperature, sample_temperature})
    lse = {t: torch.logsumexp(logits / t, 0) for t in temps}
    p_t, r = F.softmax(logits / temperature, 0), F.softmax(logits / sample_temperature, 0)
    m, vocab = 3, len(logits)
    mean_w, mean_w2, mean_f, mean_f2 = (torch.zeros(vocab, dtype=torch.float64) for _ in range(4))
    for prob, ids, c in _enumerate_draws(r, m):
        t_logp = (logits[ids] - lse[1.0]).float().view(1, 1, m)
        w = inclusion_weights(t_logp, c.view(1, 1, m), temperature, sample_temperature,
                              *(lse[t].float().view(1, 1) for t in (1.0, temperature, sample_temperature)))
        dense = torch.zeros(vocab, dtype=torch.float64).scatter_add_(0, ids, w.view(-1).double())
        freq = torch.zeros(vocab, dtype=torch.float64).scatter_add_(0, ids, c.double() / m)
        mean_w += prob * dense
        mean_w2 += prob * dense ** 2
        mean_f += prob * freq
        mean_f2 += prob * freq ** 2
    torch.testing.assert_close(mean_w, p_t, rtol=1e-5, atol=1e-7)
    if temperature == sample_temperature:
        torch.testing.assert_close(mean_f, p_t, rtol=1e-5, atol=1e-7)
        assert (mean_w2 - mean_w ** 2)[0] < 0.05 * (mean_f2 - mean_f ** 2)[0]  # the head: nearly no variance


def test_inclusion_cross_entropy_gradient_is_unbiased_and_survives_the_stored_log_probabilities():
    """E over every outcome of 3 draws of d/ds of the estimate = d/ds H(p, q): (sum w) q - w in expectation is
    q - p. Through the cache's uint8 log-probabilities (1/16 nat steps) the expected weights stay within 3.2%."""
    g = torch.Generator().manual_seed(4)
    t, s = torch.randn(6, generator=g, dtype=torch.float64) * 2, torch.randn(6, generator=g)
    p = F.softmax(t, 0)
    m = 3
    grad, mean_w_stored = torch.zeros(6), torch.zeros(6, dtype=torch.float64)
    for prob, ids, c in _enumerate_draws(p, m):
        t_logp = F.log_softmax(t, 0)[ids].float().view(1, 1, m)
        x = s.view(1, 1, 6).clone().requires_grad_(True)
        w = inclusion_weights(t_logp, c.view(1, 1, m))
        grad += prob * torch.autograd.grad(sampled_inclusion_cross_entropy(x, ids.view(1, 1, m), w), x)[0].view(6)
        stored = torch.from_numpy(dequantize_logprobs(quantize_logprobs(t_logp.numpy())))
        mean_w_stored.scatter_add_(0, ids, prob * inclusion_weights(stored, c.view(1, 1, m)).view(-1).double())
    torch.testing.assert_close(grad, (F.softmax(s, 0) - p).float(), rtol=1e-4, atol=1e-6)
    assert ((mean_w_stored / p - 1).abs() < 0.032).all()
    with pytest.raises(ValueError, match="logsumexp"):
        inclusion_weights(t_logp, c.view(1, 1, m), 2.0)
