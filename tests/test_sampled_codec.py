"""The compact sampled encoding (storage.sampled_codec): exact ids, counts and log-probability codes, read back
in the raw encoding's order (by count, descending); and a real extraction whose draws equal the raw cache's."""

import json

import numpy as np
import pytest
import torch

from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.losses import sampled_cross_entropy
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.sampled_codec import decode, encode
from kdpipe.storage.topk_codec import rank_table, ranks_of

V = 70_000  # past uint16: ids and gaps stored as int32


def draws(rng, n: int, m: int, vocab: int):
    """[n, m] distinct ids by count descending, counts summing to m, unused slots id 0 and count 0."""
    ids = np.zeros((n, m), np.int64)
    counts = np.zeros((n, m), np.int64)
    for i in range(n):
        c = np.bincount(rng.zipf(1.3, m) % vocab, minlength=vocab)
        used = np.flatnonzero(c)
        order = np.argsort(-c[used], kind="stable")
        ids[i, :len(used)], counts[i, :len(used)] = used[order], c[used][order]
    return ids, counts


def triples(ids, counts, logp):
    return [sorted((int(a), int(b), int(c)) for a, b, c in zip(i, n, q) if b > 0) for i, n, q in zip(ids, counts, logp)]


def test_round_trip_is_exact_and_in_count_order():
    rng = np.random.default_rng(0)
    for vocab, m, id_dtype in [(500, 12, np.uint16), (V, 48, np.int32), (300, 4000, np.uint16)]:
        ids, counts = draws(rng, 64, min(m, vocab), vocab)
        logp = rng.integers(0, 256, ids.shape).astype(np.uint8)
        table = rank_table(np.bincount(ids[:8][counts[:8] > 0], minlength=vocab), np.zeros(vocab, np.int64))
        slots, c, q = encode(ids, counts, logp, ranks_of(table), id_dtype, m)
        assert c.dtype == (np.uint8 if m <= 255 else np.uint16) and slots.dtype == id_dtype
        assert (slots[c == 0] == 0).all() and (q[c == 0] == 0).all(), "unused slots are zero"
        got_ids, got_counts, got_q = decode(slots, c, q, table)
        assert triples(got_ids, got_counts, got_q) == triples(ids, counts, logp)
        assert (np.diff(got_counts, axis=-1) <= 0).all() and (got_ids[got_counts == 0] == 0).all()
        assert (got_counts.sum(-1) == counts.sum(-1)).all()


def test_a_compact_sampled_cache_holds_the_raw_caches_draws_in_fewer_bytes(teachers, corpus, tmp_path):
    caches = {}
    for codec in ("compact", "float16"):
        extract(ExtractConfig(teacher=str(teachers["llama"]), data=[str(corpus)], out=str(tmp_path / codec),
                              seq_len=32, top_k=0, sample_count=12, temperatures=[1.0, 2.0], quiet=True,
                              logit_codec=codec))
        caches[codec] = TeacherCache(tmp_path / codec)
    compact, raw = caches["compact"], caches["float16"]
    assert compact.manifest.version == 4 and compact.manifest.compact_sampled and raw.manifest.version == 1
    assert compact.array("sampled/counts").dtype == np.uint8
    a, b = compact.draws(), raw.draws()
    q = [np.rint(-x / (1 / 16)).astype(np.int64) for x in (a[2], b[2])]
    assert triples(a[0].reshape(-1, 12), a[1].reshape(-1, 12), q[0].reshape(-1, 12)) == \
        triples(b[0].reshape(-1, 12), b[1].reshape(-1, 12), q[1].reshape(-1, 12))
    np.testing.assert_allclose(compact.logsumexp(), raw.logsumexp(), rtol=0, atol=2e-3)  # float16 log-norm at T=2
    np.testing.assert_array_equal(compact.logsumexp()[..., 0], raw.logsumexp()[..., 0])
    # the loss a student trains on is the same, whatever the slots' order
    logits = torch.randn(*a[0].shape[:2], compact.manifest.teacher.vocab_size, generator=torch.Generator().manual_seed(0))
    losses = [sampled_cross_entropy(logits, torch.from_numpy(x[0]), torch.from_numpy(x[1])) for x in (a, b)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)


def test_a_cache_without_the_draws_log_probabilities_serves_their_temperature_only(teachers, corpus, tmp_path):
    """--no-sample-logprobs: the same draws and normalizers without `sampled/logprobs`; kd at the sampling
    temperature trains on them exactly as on the full cache, kd at another is refused before training with the
    flag that fixes it, and a resume that would change the choice is refused, either way."""
    from click.testing import CliRunner

    from kdpipe.cli import cli
    from kdpipe.errors import UserError
    from kdpipe.stage2_distill.trainer import DistillConfig, distill

    def kdpipe(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    args = ["extract", "--teacher", teachers["llama"], "--data", corpus, "--seq-len", 32, "--top-k", 0,
            "--sample-count", 12, "--sequences-per-unit", 4]
    full, lean = tmp_path / "full", tmp_path / "lean"
    for out, extra in ((full, []), (lean, ["--no-sample-logprobs"])):
        r = kdpipe(*args, "--out", out, *extra)
        assert r.exit_code == 0, r.output
    a, b = TeacherCache(full), TeacherCache(lean)
    assert a.manifest.signals.sampled_logprobs and not b.manifest.signals.sampled_logprobs
    assert (full / "sampled" / "logprobs").is_dir() and not (lean / "sampled" / "logprobs").exists()
    (ids_a, counts_a, _), (ids_b, counts_b, logp_b) = a.draws(), b.draws()
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(counts_a, counts_b)
    assert logp_b is None
    # T=2's normalizer would only weight the draws by their log-probabilities: T=1's alone is stored
    assert a.manifest.signals.temperatures == [1.0, 2.0] and b.manifest.signals.temperatures == [1.0]
    np.testing.assert_array_equal(a.logsumexp()[..., :1], b.logsumexp())
    assert "no log-probabilities: serves T=1 only" in kdpipe("inspect", lean).output

    def train(cache, out, method, steps=3):
        return distill(DistillConfig(cache=[str(cache)], student="teacher:layers=2", out=str(out), method=[method],
                                     steps=steps, batch_size=4, lr=3e-3, eval_sequences=4, quiet=True))
    losses, finals = [], []
    for cache in (full, lean):
        finals.append(train(cache, tmp_path / f"run-{cache.name}", "kd:estimator=sampled").final)
        lines = (tmp_path / f"run-{cache.name}" / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(x)["loss"] for x in lines if '"loss"' in x])
    assert losses[0] and losses[0] == losses[1], "the same draws train the same student"
    # held out: KL where the teacher's entropy is known; else the cross-entropy to its draws, KL + that entropy
    assert "eval/kl_teacher" in finals[0] and "eval/kl_teacher" not in finals[1]
    assert finals[1]["eval/ce_teacher"] > finals[0]["eval/kl_teacher"] > 0
    with pytest.raises(UserError, match=r"--sample-count 12 without --no-sample-logprobs .*--no-sample-logprobs"):
        train(lean, tmp_path / "t2", "kd:estimator=sampled,temperature=2", steps=1)
    for out, extra, fix in ((full, ["--no-sample-logprobs"], "drop --no-sample-logprobs to resume it"),
                            (lean, [], "--no-sample-logprobs resumes a cache made without them")):
        r = kdpipe(*args, "--out", out, "--resume", *extra)
        assert r.exit_code == 2 and fix in r.output and "Traceback" not in r.output, r.output
