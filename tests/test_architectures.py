"""Any decoder a user brings: students of per-layer-pattern teachers (Qwen2, Gemma 3), the student's own
sliding windows in stage 2, tokenizers and vocabularies that must agree, BOS as the tokenizer adds it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from kdpipe.capture import Capture
from kdpipe.errors import UserError
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage2_distill.features import causal_log_probs
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from kdpipe.storage.reader import TeacherCache
from test_cli import assert_user_error, extract_args, kdpipe
from tiny import WINDOW, make_model, make_tokenizer, save_teacher


def small_cache(teacher: Path, corpus: Path, out: Path, **kw) -> Path:
    cfg = dict(teacher=str(teacher), data=[str(corpus)], out=str(out), seq_len=32, top_k=8, hidden_layers="all",
               attention_layers="all", sequences_per_unit=4, quiet=True)
    extract(ExtractConfig(**{**cfg, **kw}))
    return out


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_a_smaller_student_of_a_layer_pattern_teacher_trains_saves_and_reloads(arch, teachers, corpus, tmp_path):
    cache = small_cache(teachers[arch], corpus, tmp_path / "c")
    result = distill(DistillConfig(cache=[str(cache)], student="teacher:layers=2", out=str(tmp_path / "run"), steps=3,
                                   batch_size=4, eval_sequences=8, method=["kd", "tinybert:weight=0.1"], quiet=True))
    config = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    teacher_types = json.loads((teachers[arch] / "config.json").read_text())["layer_types"]
    assert config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    picked = [teacher_types[t - 1] for _, t in map_layers("uniform", 2, len(teacher_types))]
    assert config["layer_types"] == picked, "the types of the teacher layers the student's layers map to"
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert student.config.layer_types == config["layer_types"] and result.final


def test_student_attention_in_stage_2_uses_the_students_own_sliding_windows():
    """What the attention methods compare for the student is its real attention: rebuilt from its captured
    Q/K under the mask its own blocks applied (Gemma 3: windowed on alternate layers)."""
    student = make_model("gemma3", 149, layers=2, seed=3).eval()
    ids = torch.randint(4, 149, (2, 32))
    with torch.no_grad(), Capture(student, attention_layers=[1, 2], attention_form="factors") as cap:
        student(input_ids=ids)
    eager = make_model("gemma3", 149, layers=2, seed=3)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        want = eager(input_ids=ids, output_attentions=True).attentions
    for layer in (1, 2):
        q, k, _ = cap.attention[layer]
        got = causal_log_probs(q, k, cap.scaling, cap.masks[layer]).exp()
        torch.testing.assert_close(got, want[layer - 1], atol=1e-5, rtol=1e-4)
    allowed = cap.masks[1].reshape(-1, 32, 32)[0]
    assert allowed[31].sum() == WINDOW and cap.masks[2].reshape(-1, 32, 32)[0][31].sum() == 32


def test_a_foreign_tokenizer_is_refused(teachers, corpus, tmp_path):
    other = make_tokenizer()
    vocab = other.get_vocab()
    shuffled = tmp_path / "tok"
    words = sorted(vocab, key=lambda w: -vocab[w])  # the same tokens under other ids
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(shuffled)
    assert_user_error(kdpipe(*extract_args(teachers["llama"], corpus, tmp_path / "c", "--tokenizer", shuffled)),
                      "another vocabulary than the teacher's own tokenizer")
    assert not (tmp_path / "c").exists()


def test_caches_of_teachers_with_other_vocabularies_are_refused(teachers, corpus, tmp_path):
    """Same token ids (one tokenizer), but the second teacher has 300 logits: its top-k ids are not the
    student's vocabulary. Refused whichever cache comes first."""
    wide = tmp_path / "wide"
    model = make_model("llama", 300, seed=4)
    model.save_pretrained(wide)
    make_tokenizer().save_pretrained(wide)
    a = small_cache(teachers["llama"], corpus, tmp_path / "a", hidden_layers="none", attention_layers="none")
    b = small_cache(wide, corpus, tmp_path / "b", hidden_layers="none", attention_layers="none")
    assert TeacherCache(a).manifest.data.fingerprint == TeacherCache(b).manifest.data.fingerprint
    for first, second in ((a, b), (b, a)):
        with pytest.raises(UserError, match="different vocabularies|the student has"):
            distill(DistillConfig(cache=[str(first), str(second)], student="teacher:layers=1", method=["tmkd"],
                                  out=str(tmp_path / f"run{first.name}"), steps=1, batch_size=4, quiet=True))


def test_packed_documents_start_with_the_bos_their_tokenizer_adds(corpus, tmp_path):
    from tokenizers.processors import TemplateProcessing

    teacher = save_teacher(tmp_path / "t", "llama")
    tok = transformers.AutoTokenizer.from_pretrained(teacher)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    tok.save_pretrained(teacher)
    assert transformers.AutoTokenizer.from_pretrained(teacher)("the")["input_ids"][0] == 2
    cache = TeacherCache(small_cache(teacher, corpus, tmp_path / "c", packing="padded", hidden_layers="none",
                                     attention_layers="none"))
    ids = cache.input_ids()
    docs = sorted(corpus.glob("*.txt"))
    first_words = tok(docs[0].read_text().split()[0], add_special_tokens=False)["input_ids"]
    assert ids[0, 0] == 2 and ids[0, 1] == first_words[0], "BOS, then the document"
    assert (ids[:, 0] == 2).sum() >= len(docs), "every document begins with BOS"
    assert np.count_nonzero(ids == 2) == len(docs)
