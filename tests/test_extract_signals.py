"""Every stored signal against the model's own forward, for every supported decoder family: full logits
(after the model's own scaling and soft-capping), output_hidden_states, output_attentions (eager, with the
model's sliding windows), and attention rebuilt from Q/K/V factors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from kdpipe.errors import UserError
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.logits import LogitSignals, LogitSpec, distinct_counts, systematic_draws
from kdpipe.storage.codecs import LOGPROB_FLOOR, LOGPROB_STEP
from kdpipe.storage.reader import TeacherCache
from tiny import FAMILIES, WINDOW


def run(teacher: Path, corpus: Path, out: Path, **kw) -> TeacherCache:
    cfg = dict(teacher=str(teacher), data=[str(corpus)], out=str(out), seq_len=32, batch_size=4, top_k=8,
               temperatures=[1.0, 2.0], sequences_per_unit=8, quiet=True)
    cfg.update(kw)
    extract(ExtractConfig(**cfg))
    return TeacherCache(out)


def reference(teacher: Path, cache: TeacherCache):
    """Full logits, all hidden states and all attention maps from a plain eager forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher, attn_implementation="eager").eval()
    ids = torch.from_numpy(cache.input_ids()).long()
    mask = None
    if cache.manifest.data.packing == "padded":
        mask = (torch.arange(ids.shape[1])[None] < torch.from_numpy(cache.lengths())[:, None]).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    return out


def valid_rows(cache: TeacherCache) -> np.ndarray:
    """[N, T] mask of positions that hold real tokens."""
    return np.arange(cache.seq_len)[None, :] < cache.lengths()[:, None]


@pytest.mark.parametrize("arch", FAMILIES)
def test_signals_match_the_models_own_forward(arch, teachers, corpus, tmp_path):
    cache = run(teachers[arch], corpus, tmp_path / "c", hidden_layers="all", attention_layers="all",
                attention_form="probs", logit_codec="float16")
    ref = reference(teachers[arch], cache)
    logits = ref.logits.float()

    ids, values, lse = cache.topk()
    want_values, _ = logits.topk(8, dim=-1)
    # values are the top-k of the full logits (fp16 storage), and the stored ids point at those values (ties aside)
    np.testing.assert_allclose(values, want_values.numpy(), rtol=2e-3, atol=2e-3)
    gathered = torch.gather(logits, -1, torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(gathered, values, rtol=2e-3, atol=2e-3)
    assert (np.diff(values, axis=-1) <= 0).all(), "top-k must be sorted descending"
    check_normalizers(cache, logits, ids, lse, rtol=1e-4, atol=1e-5)

    for layer in range(cache.manifest.teacher.num_layers + 1):
        want = ref.hidden_states[layer].numpy()
        np.testing.assert_allclose(cache.hidden(layer), want, rtol=1e-3, atol=2e-3, err_msg=f"hidden layer {layer}")
    for layer in range(1, cache.manifest.teacher.num_layers + 1):
        want = ref.attentions[layer - 1].numpy()
        np.testing.assert_allclose(cache.attention_probs(layer), want, atol=1e-3, err_msg=f"attention layer {layer}")


def check_normalizers(cache: TeacherCache, logits: torch.Tensor, ids: np.ndarray, lse: np.ndarray, rtol, atol):
    for i, temp in enumerate([1.0, 2.0]):
        np.testing.assert_allclose(lse[..., i], torch.logsumexp(logits / temp, -1).numpy(), rtol=1e-5, atol=atol)
        # the mass outside the top-k, against float64 over the model's own logits
        logq = torch.log_softmax(logits.double() / temp, -1)
        tail = logq.scatter(-1, torch.from_numpy(ids), float("-inf")).logsumexp(-1)
        np.testing.assert_allclose(cache.logtail()[..., i], tail.numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("arch", FAMILIES)
def test_compact_topk_matches_the_models_own_forward(arch, teachers, corpus, tmp_path):
    """The default encoding: the same ids (the argmax first), log-probabilities within the manifest's bound
    of the model's own, a top-k that holds exactly 1 - tail, the normalizers to float16 precision."""
    cache = run(teachers[arch], corpus, tmp_path / "c")
    assert cache.manifest.signals.topk_codec == "compact-v1" and cache.manifest.version == 2
    bound = cache.manifest.signals.topk_error
    assert 0 < bound <= 0.25
    logits = reference(teachers[arch], cache).logits.float()
    logp = torch.log_softmax(logits.double(), -1)
    ids, values, lse = cache.topk_logprobs()
    true = torch.gather(logp, -1, torch.from_numpy(ids)).numpy()
    assert np.abs(values - true).max() <= bound
    want = logp.topk(8, dim=-1).values.numpy()
    np.testing.assert_allclose(np.sort(true, -1), np.sort(want, -1), atol=1e-6)  # the same set (ties aside)
    np.testing.assert_allclose(true[..., 0], want[..., 0], atol=1e-6)  # slot 0 is the argmax
    assert (np.diff(values, axis=-1) <= 0).all(), "top-k must be sorted descending"
    tail = cache.logtail()[..., 0].astype(np.float64)
    np.testing.assert_allclose(np.exp(values.astype(np.float64)).sum(-1) + np.exp(tail), 1.0, atol=1e-5)
    check_normalizers(cache, logits, ids, lse, rtol=2e-3, atol=4e-3)


@pytest.mark.parametrize("arch", FAMILIES)
def test_probs_recomputed_from_factors_match_eager(arch, teachers, corpus, tmp_path):
    """Sliding windows included: Mistral on every layer, Qwen2 above its first layer, Gemma 3 on alternate
    layers; the manifest records each layer's window and the reader applies it."""
    cache = run(teachers[arch], corpus, tmp_path / "c", attention_layers="all", attention_form="factors")
    ref = reference(teachers[arch], cache)
    m = cache.manifest.teacher
    q, k, v = cache.attention_factors(1)
    assert q.shape[1:] == (m.num_heads, 32, m.head_dim) and k.shape[1] == m.num_kv_heads
    windows = {"mistral": [WINDOW] * 3, "qwen2": [0, WINDOW, WINDOW], "gemma3": [WINDOW, 0, WINDOW]}
    assert cache.manifest.signals.attention_windows == windows.get(arch, [0, 0, 0])
    for layer in range(1, m.num_layers + 1):
        np.testing.assert_allclose(cache.attention_probs(layer), ref.attentions[layer - 1].numpy(), atol=2e-3)


def test_an_encoder_teacher_is_refused(teachers, corpus, tmp_path):
    with pytest.raises(UserError, match="BertForMaskedLM is an encoder"):
        run(teachers["bert"], corpus, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_head_kdpipe_does_not_reproduce_is_refused_before_anything_is_written(teachers, corpus, tmp_path):
    """A model that changes its logits after the head in a way kdpipe does not know (here: adds a per-token
    bias) is caught by comparing with its own forward, and refused by name."""
    model = transformers.AutoModelForCausalLM.from_pretrained(teachers["llama"]).eval()
    forward = model.forward

    def skewed(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits + torch.linspace(0, 3, out.logits.shape[-1])
        return out

    model.forward = skewed
    with pytest.raises(UserError, match="LlamaForCausalLM's output head is not reproduced"):
        extract(ExtractConfig(teacher=str(teachers["llama"]), data=[str(corpus)], out=str(tmp_path / "c"),
                              seq_len=32, quiet=True), model=model)
    assert not (tmp_path / "c").exists()


def test_padded_packing_stores_lengths_and_masks(teachers, corpus, tmp_path):
    cache = run(teachers["llama"], corpus, tmp_path / "c", packing="padded", seq_len=64, hidden_layers="last:1",
                attention_layers="1", attention_form="factors")
    lengths = cache.lengths()
    assert (lengths < 64).any() and (lengths > 0).all(), "padded mode must store short rows' lengths"
    ref = reference(teachers["llama"], cache)
    ok = valid_rows(cache)
    _, values, lse = cache.topk()
    np.testing.assert_allclose(lse[..., 0][ok], torch.logsumexp(ref.logits.float(), -1).numpy()[ok], rtol=1e-5)
    np.testing.assert_allclose(cache.hidden(3)[ok], ref.hidden_states[3].numpy()[ok], rtol=1e-3, atol=2e-3)
    probs = cache.attention_probs(1)
    want = ref.attentions[0].numpy()
    for n in range(len(lengths)):
        L = lengths[n]
        np.testing.assert_allclose(probs[n, :, :L, :L], want[n, :, :L, :L], atol=2e-3)


def test_device_map_auto_gives_the_same_cache(teachers, corpus, tmp_path):
    a = run(teachers["llama"], corpus, tmp_path / "a")
    b = run(teachers["llama"], corpus, tmp_path / "b", device="auto")
    for x, y in zip(a.topk(), b.topk()):
        np.testing.assert_array_equal(x, y)


def test_logit_slices_do_not_change_results(teachers, corpus, tmp_path):
    """Projecting 8 positions at a time (pieces of one sequence) equals projecting many sequences at once."""
    a = run(teachers["gpt2"], corpus, tmp_path / "a", logit_rows=8, sample_count=4)
    b = run(teachers["gpt2"], corpus, tmp_path / "b", logit_rows=4096, sample_count=4, batch_size=3)
    for x, y in zip(a.topk() + a.sampled() + (a.logtail(), a.sampled_logprobs()),
                    b.topk() + b.sampled() + (b.logtail(), b.sampled_logprobs())):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("temperature,sampler", [(1.0, "multinomial"), (2.0, "multinomial"), (2.0, "systematic")])
def test_sampled_logits_follow_the_teacher_distribution(temperature, sampler, teachers, corpus, tmp_path):
    m = 4000
    cache = run(teachers["llama"], corpus, tmp_path / "c", sample_count=m, sample_temperature=temperature,
                max_sequences=2, sampler=sampler)
    assert cache.manifest.signals.sampler == sampler
    ref = reference(teachers["llama"], cache)
    probs = torch.softmax(ref.logits.float() / temperature, -1).numpy()
    ids, counts = cache.sampled()
    assert (counts.sum(-1) == m).all()
    # each drawn id's T=1 log-probability, what weights the draws for another temperature: within half a
    # 1/16-nat step, or at the floor for the rarest draws
    used = counts > 0
    want = torch.log_softmax(ref.logits.float(), -1).gather(-1, torch.from_numpy(ids)).numpy()
    got = cache.sampled_logprobs()
    assert (np.abs(got - np.maximum(want, -LOGPROB_FLOOR))[used] <= LOGPROB_STEP / 2 + 1e-4).all()
    assert (np.diff(counts, axis=-1) <= 0).all(), "unique ids are stored by count, descending"
    for n, t in [(0, 0), (0, 17), (1, 31)]:
        used = counts[n, t] > 0
        assert len(set(ids[n, t][used])) == used.sum()
        freq = np.zeros(probs.shape[-1])
        freq[ids[n, t][used]] = counts[n, t][used] / m
        if sampler == "systematic":  # every count is floor or ceil of m p against the model's own forward
            assert (np.abs(freq * m - probs[n, t] * m) < 1 + 1e-3).all()
            assert (freq[probs[n, t] * m >= 1 + 1e-3] > 0).all(), "a token with m p >= 1 is always drawn"
        else:  # each frequency within 5 standard errors of its probability
            se = np.sqrt(probs[n, t] * (1 - probs[n, t]) / m) + 1e-4
            assert (np.abs(freq - probs[n, t]) < 5 * se).all()


@pytest.mark.parametrize("gap", [3.0, 40.0, 95.0, 110.0, 160.0])
def test_logsumexp_and_tail_at_t1_and_t2_match_float64_down_to_tails_below_float32(gap):
    """The T=2 sums come from the T=1 terms' square roots; a tail whose T=1 terms are denormal or 0 (a gap of
    95-160 nats below the top-k) is still exact at T=2, where it is representable (e^-47 .. e^-80)."""
    g = torch.Generator().manual_seed(0)
    k, v = 8, 3000
    logits = torch.randn(2, 5, v, generator=g, dtype=torch.float64)
    logits[..., :k] += gap + 5  # the top-k stand `gap` nats above the rest
    signals = LogitSignals(LogitSpec(top_k=k, temperatures=[1.0, 2.0, 0.5], vocab_size=v, rows=4))
    signals.compute(logits.float(), lambda h: h, [0, 1])
    x = logits.float().double()  # what float32 logits hold, then exactly
    for i, temp in enumerate([1.0, 2.0, 0.5]):
        lse = torch.logsumexp(x / temp, -1)
        tail = torch.logsumexp(x[..., k:] / temp, -1) - lse
        torch.testing.assert_close(signals.logsumexp[..., i].double(), lse, rtol=1e-6, atol=1e-5)
        if tail.min() > -80:  # float32 resolves the tail mass (e^-87 and above); below, -inf or the nearest
            torch.testing.assert_close(signals.logtail[..., i].double(), tail, rtol=0, atol=1e-4)
        else:
            assert (signals.logtail[..., i] < -80).all()


def test_systematic_draws_are_unbiased_by_exact_enumeration_and_never_off_by_one():
    """E[count_i] = m p_i over the offset u, integrated exactly: count(u) is constant between the breakpoints
    frac(m C_i), so its mean is the length-weighted sum over those pieces. Peaked rows, a 1e-12 tail, zeros."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(40, generator=g).mul(3).exp(), torch.tensor([1.0, 1e-12, 3e-9, 0.0, 0.25, 0.0, 7.0]),
            torch.tensor([1.0, 1e-7]), torch.softmax(torch.randn(40, generator=g) * 9, -1)]
    for m, block in [(1, 256), (5, 256), (12, 256), (12, 4), (5, 3)]:  # small blocks: the two-level search
        for w in rows:
            p = w.double() / w.double().sum()
            cdf = p.cumsum(0)
            cuts = torch.cat([torch.zeros(1, dtype=torch.float64), torch.frac(m * cdf), torch.ones(1, dtype=torch.float64)])
            cuts = cuts.unique()  # sorted
            mid, width = ((cuts[1:] + cuts[:-1]) / 2).view(-1, 1), cuts[1:] - cuts[:-1]
            draws = systematic_draws(w.expand(len(mid), -1), m, mid, block=block)
            counts = torch.zeros(len(mid), len(w), dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(
                draws, dtype=torch.float64))
            assert (counts.sum(-1) == m).all()
            expected = (counts * width.view(-1, 1)).sum(0)
            # block sums are float32 (relative error ~1e-7): the offsets that move a point across a block's
            # edge are that far from the float64 breakpoints
            torch.testing.assert_close(expected, m * p, rtol=0, atol=1e-5)
            assert ((counts - m * p).abs() < 1 + 1e-5).all(), "a count is floor(m p) or ceil(m p)"
            assert (counts[:, p == 0] == 0).all(), "a token of probability 0 is never drawn"
            variance = (((counts - m * p) ** 2) * width.view(-1, 1)).sum(0)
            assert (variance <= 0.25 + 1e-5).all()  # independent draws: m p (1 - p), up to m / 4


def test_distinct_counts_equal_a_dense_count_of_the_draws():
    """The m draws' distinct ids with their counts, most drawn first, are the dense count over the vocabulary."""
    g = torch.Generator().manual_seed(0)
    draws = torch.randint(0, 7, (50, 12), generator=g)  # many repeats
    draws[0], draws[1] = 3, torch.arange(12).flip(0)  # one id drawn m times; m distinct ids
    ids, counts = distinct_counts(draws)
    dense = torch.zeros(50, 12, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))
    assert torch.equal(torch.zeros_like(dense).scatter_add_(1, ids, counts), dense)  # the padding adds 0 to id 0
    assert torch.equal((counts > 0).sum(-1), (dense > 0).sum(-1)), "each drawn id in one slot"
    assert (counts[:, 1:] <= counts[:, :-1]).all() and (ids[counts == 0] == 0).all()
    assert counts[0, 0] == 12 and ids[0, 0] == 3 and torch.equal(ids[1], torch.arange(12))  # ties by id


def test_fingerprint_same_for_same_tokens_differs_for_one_token(teachers, corpus, tmp_path):
    a = run(teachers["llama"], corpus, tmp_path / "a")
    b = run(teachers["gpt2"], corpus, tmp_path / "b")  # another teacher, same tokenizer and data
    assert a.manifest.data.fingerprint == b.manifest.data.fingerprint
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in sorted(corpus.iterdir()):
        (changed / f.name).write_text(f.read_text())
    doc = changed / "doc03.txt"
    words = doc.read_text().split()
    words[5] = "people" if words[5] != "people" else "world"
    doc.write_text(" ".join(words))
    c = run(teachers["llama"], changed, tmp_path / "c")
    assert c.manifest.data.fingerprint != a.manifest.data.fingerprint
    assert (c.input_ids() != a.input_ids()).sum() == 1
