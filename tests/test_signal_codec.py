"""The int8 hidden-state and attention codes (storage.signal_codec) against float64, on states with real-scale
massive activations (SmolLM2-135M: |h| up to ~23,000 on a few channels), and the budget ladder
(storage.budget) against the bytes its settings give."""

import numpy as np
import pytest
import torch

from kdpipe.errors import UserError
from kdpipe.storage import budget
from kdpipe.storage.signal_codec import LEVELS, HiddenCodec, dequantize, quantize

H = 96


def decoder_states(n: int, seed: int) -> torch.Tensor:
    """[n, H] float32 like a real decoder's: low-rank structure plus noise, a few channels at ~23,000 on every
    token and one that spikes on a few tokens only (the first of a document)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, H, generator=torch.Generator().manual_seed(1))  # the same structure for every call
    x = torch.randn(n, 12, generator=g) @ mix + 0.3 * torch.randn(n, H, generator=g)
    x[:, :3] = x[:, :3] * 40 + torch.tensor([23_000.0, -18_000.0, 9_000.0])
    x[::50, 5] += 2_000.0
    return x


def test_int8_keeps_every_channel_of_a_decoder_with_massive_activations():
    """Every coordinate within half a step of float64 in the channel-scaled space, so the ordinary channels keep
    ~1% accuracy next to 23,000s; coded per vector in raw space instead, those channels would all read as 0."""
    calib, states = decoder_states(2048, 0), decoder_states(512, 1)
    code, left_out = HiddenCodec.fit(calib)
    assert left_out == 0 and code.basis is None
    q, step = code.encode(states)
    assert q.dtype == torch.int8 and step.dtype == torch.float16 and q.shape == states.shape
    y = (states.double() - code.center.double()) / code.scale.double()
    back = (code.decode(q, step).double() - code.center.double()) / code.scale.double()
    half = step.double()[:, None] / 2 * (1 + 2 ** -10) + 1e-6  # float16's rounding of the step
    assert ((back - y).abs() <= half).all()
    ordinary = slice(6, None)
    err = (code.decode(q, step)[:, ordinary].double() - states[:, ordinary].double()).pow(2).mean().sqrt()
    assert err / states[:, ordinary].double().pow(2).mean().sqrt() < 0.03
    naive = dequantize(*quantize(states))  # one scale per raw vector: 23,000 / 127 per step
    assert (naive[:, ordinary] == 0).float().mean() > 0.9


@pytest.mark.parametrize("rank", [8, 24, 64])
def test_projection_is_the_float64_projection_onto_the_top_principal_directions(rank):
    """decode(encode(h)) is h projected by B B^T in the channel-scaled space (B the top-`rank` eigenvectors of the
    calibration covariance, in float64), up to the quantization bound; what it leaves out is as measured."""
    calib, states = decoder_states(4096, 0), decoder_states(512, 1)
    code, left_out = HiddenCodec.fit(calib, rank)
    assert code.basis.shape == (H, rank)
    x = calib.double()
    y = (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-6 * x.var(0, unbiased=False).mean()).sqrt()
    values, vectors = np.linalg.eigh((y.T @ y / len(y)).numpy())
    basis = torch.from_numpy(vectors[:, ::-1][:, :rank].copy())
    assert left_out == pytest.approx(1 - values[::-1][:rank].sum() / values.sum(), rel=1e-6, abs=1e-9)
    np.testing.assert_allclose((code.basis.double().T @ basis).abs().diag().numpy(), 1, atol=1e-4)  # same span

    center, scale = code.center.double(), code.scale.double()
    ys = (states.double() - center) / scale
    projected = ys @ basis @ basis.T
    q, step = code.encode(states)
    back = (code.decode(q, step).double() - center) / scale
    bound = (step.double() / 2 * (1 + 2 ** -10))[:, None] * np.sqrt(rank)  # |B e| <= sqrt(r) max|e|
    assert ((back - projected).norm(dim=-1, keepdim=True) <= bound + 1e-4).all()
    if rank < 64:  # the projection is the only loss that matters: the residual dominates the int8 error
        assert (back - projected).pow(2).sum() < 0.05 * (ys - projected).pow(2).sum()


def test_attention_factors_in_int8_within_half_a_step_and_their_scores_close():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 32, 16, generator=g) * torch.linspace(0.1, 30, 16)  # RoPE pairs of very different size
    k = torch.randn(2, 2, 32, 16, generator=g) * 3
    for x in (q, k):
        codes, step = quantize(x)
        assert codes.abs().max() <= LEVELS and step.shape == x.shape[:-1]
        assert ((dequantize(codes, step) - x).abs() <= step.float()[..., None] / 2 * (1 + 2 ** -10) + 1e-6).all()
    # scores: |q'k' - qk| <= |dq||k| + |q||dk| + |dq||dk|, each |dx| <= sqrt(d) step / 2
    (qc, qs), (kc, ks) = quantize(q), quantize(k)
    qd, kd = dequantize(qc, qs).double(), dequantize(kc, ks).repeat_interleave(2, 1).double()
    exact = q.double() @ k.repeat_interleave(2, 1).double().transpose(-1, -2)
    coded = qd @ kd.transpose(-1, -2)
    dq = (qs.double() / 2 * (1 + 2 ** -10) * 4)[..., :, None]  # sqrt(16) = 4
    dk = (ks.repeat_interleave(2, 1).double() / 2 * (1 + 2 ** -10) * 4)[..., None, :]
    qn, kn = q.double().norm(dim=-1)[..., :, None], k.repeat_interleave(2, 1).double().norm(dim=-1)[..., None, :]
    assert ((coded - exact).abs() <= dq * kn + qn * dk + dq * dk + 1e-6).all()
    assert (coded - exact).abs().mean() < 0.01 * exact.abs().mean()


def test_zero_vectors_encode_to_zero():
    q, step = quantize(torch.zeros(3, 8))
    assert (q == 0).all() and (dequantize(q, step) == 0).all()


LLAMA_100B = budget.Shapes(9216, 8, 2, 72, 8, 128, 2048, "factors", 16)


@pytest.mark.parametrize("target", [192_512, 96_624, 50_000, 20_000, 8_000, 2_000, 1_500])
def test_every_budget_the_ladder_meets_it_meets_and_more_bytes_never_store_less(target):
    chosen = budget.fit(target, LLAMA_100B)
    assert sum(budget.bytes_per_token(chosen, LLAMA_100B).values()) <= target
    richer = budget.fit(target * 1.5, LLAMA_100B)
    assert sum(budget.bytes_per_token(richer, LLAMA_100B).values()) >= \
        sum(budget.bytes_per_token(chosen, LLAMA_100B).values())
    assert chosen.hidden_rank % budget.RANK_STEP == 0


def test_the_ladder_keeps_a_quarter_of_the_width_before_it_drops_sequences_and_names_the_least_budget():
    at_8kb = budget.fit(8000, LLAMA_100B)
    assert (at_8kb.hidden_codec, at_8kb.attention_codec, at_8kb.attention_rank) == ("int8", "int8", 128 // 4)
    assert at_8kb.hidden_rank >= 9216 // 4 and 1 <= at_8kb.signal_sequences < 16
    quarter = budget.Settings("int8", 9216 // 4 // budget.RANK_STEP * budget.RANK_STEP, "int8")
    both = budget.Settings("int8", quarter.hidden_rank, "int8", attention_rank=32)
    for target in range(2_000, 100_000, 1_000):  # heads narrow only once a quarter of the hidden width does not
        chosen = budget.fit(target, LLAMA_100B)  # fit, and sequences drop only once a quarter of both does not
        total = lambda s: sum(budget.bytes_per_token(s, LLAMA_100B).values())  # noqa: E731
        assert bool(chosen.attention_rank) == (total(quarter) > target)
        assert bool(chosen.signal_sequences) == (total(both) > target)
        assert not chosen.signal_sequences or chosen.hidden_rank >= 9216 // 4
    assert budget.fit(192_512, LLAMA_100B) == budget.Settings()  # the exact cache when it fits
    full = budget.fit(100_000, LLAMA_100B)
    assert (full.hidden_rank, full.signal_sequences) == (0, 0)  # int8, every channel and sequence
    with pytest.raises(UserError, match=r"32-dimensional attention heads, 1 sequence of every 16\) needs 379 B/token: "
                                        r"raise --signal-budget to at least 379B") as err:
        budget.fit(300, LLAMA_100B)
    least = float(str(err.value).split("at least ")[1].split("B")[0].replace(",", ""))
    assert sum(budget.bytes_per_token(budget.fit(least, LLAMA_100B), LLAMA_100B).values()) <= least
