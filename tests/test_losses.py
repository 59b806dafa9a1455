"""Each logit loss against its full-vocabulary reference."""

import pytest
import torch
import torch.nn.functional as F

from kdpipe.stage2_distill.losses import (bucket_kl, lm_loss, renormalized_topk_kl, sampled_cross_entropy,
                                          teacher_logprobs, topk_logit_mse)

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
