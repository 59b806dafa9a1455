"""`kdpipe inspect --stats`: top-k mass and entropy bounds over the whole cache, against the full logits."""

import json

import numpy as np
import torch

from kdpipe.pipeline.stats import cache_stats
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.storage.reader import TeacherCache
from test_cli import assert_user_error, kdpipe
from test_extract_signals import reference
from tiny import save_teacher


def test_stats_match_the_full_distribution(corpus, tmp_path):
    teacher = save_teacher(tmp_path / "t", "llama", sharpness=10)
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(tmp_path / "c"), seq_len=32, top_k=8,
                          sequences_per_unit=4, quiet=True))
    cache = TeacherCache(tmp_path / "c")
    p = torch.softmax(reference(teacher, cache).logits.double(), -1)
    mass = p.topk(8, -1).values.sum(-1)
    entropy = -(p * p.log()).sum(-1)
    s = cache_stats(str(tmp_path / "c"))
    assert s["positions"] == cache.num_sequences * 32
    # 1 - the stored tail, exact to float16's precision of its log (the compact top-k's): 2^-11 relative
    np.testing.assert_allclose(s["topk_mass"]["mean"], mass.mean().item(), atol=1e-5)
    np.testing.assert_allclose(s["mean_mass_at_k"]["1"], p.max(-1).values.mean().item(), atol=2e-3)
    assert s["mean_mass_at_k"]["1"] < s["mean_mass_at_k"]["4"] < s["mean_mass_at_k"]["8"]
    np.testing.assert_allclose(s["mean_mass_at_k"]["8"], s["topk_mass"]["mean"], atol=2e-3)  # float16 sum vs exact
    assert s["entropy_nats"]["mean_lower_bound"] <= entropy.mean().item() <= s["entropy_nats"]["mean_upper_bound"]
    assert sum(s["topk_mass"]["histogram"]) == s["positions"]
    np.testing.assert_allclose(s["topk_mass"]["fraction_below_0.5"], (mass < 0.5).double().mean().item(), atol=0.01)

    png = tmp_path / "stats.png"
    shown = kdpipe("inspect", tmp_path / "c", "--stats", "--plot", png)
    assert shown.exit_code == 0, shown.output
    assert "top-8 mass: mean" in shown.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = json.loads(kdpipe("inspect", tmp_path / "c", "--stats", "--json").stdout)
    assert as_json["stats"]["topk_mass"]["mean"] == s["topk_mass"]["mean"]
    assert_user_error(kdpipe("inspect", tmp_path / "c", "--plot", png), "--stats")


def test_stats_read_tiny_tails_from_the_stored_tail_not_one_minus_the_top_k(corpus, tmp_path):
    """A peaked teacher leaves ~1e-9 outside its top-8: 1 - (sum of float16 probabilities) is rounding noise
    there, the stored log tail is the tail (against float64 over the model's own logits)."""
    teacher = save_teacher(tmp_path / "t", "llama", sharpness=400)
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(tmp_path / "c"), seq_len=32, top_k=8,
                          sequences_per_unit=4, quiet=True))
    cache = TeacherCache(tmp_path / "c")
    logq = torch.log_softmax(reference(teacher, cache).logits.double(), -1)
    tail = logq.scatter(-1, logq.topk(8, -1).indices, float("-inf")).logsumexp(-1)
    assert tail.exp().mean() < 1e-4, "the teacher is not peaked enough for this test"
    s = cache_stats(str(tmp_path / "c"))
    assert s["tail_mass"]["source"] == "logits/logtail"
    np.testing.assert_allclose(s["tail_mass"]["mean"], tail.exp().mean().item(), rtol=1e-3)
    # what the float16 top-k alone would say is off by more than the tail itself
    _, values, _ = cache.topk()
    from_topk = 1 - np.exp(values.astype(np.float64)).sum(-1)
    assert abs(from_topk.mean() - tail.exp().mean().item()) > tail.exp().mean().item()
