"""ALBERT-style students: factorized embeddings and one shared block; the parameter count is the
direct sum of the shared parts, hooks see each position, the student trains with KD and with a
layer method, and the saved student is a plain model computing the same function."""

import json

import numpy as np
import pytest
import torch
import transformers

from kdpipe.capture import Capture, find_blocks
from kdpipe.errors import UserError
from kdpipe.stage2_distill.albert import SharedBlock, export
from kdpipe.stage2_distill.evaluate import evaluate_model
from kdpipe.stage2_distill.student import build_student
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from kdpipe.storage.reader import TeacherCache


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared tensors count once


def test_albert_student_shares_its_blocks_and_factorizes_embeddings(layer_cache):
    teacher = TeacherCache(layer_cache).manifest.teacher
    plain = build_student("teacher:layers=4,hidden=32", teacher, 0).model
    albert = build_student("teacher:layers=4,hidden=32,albert=1,embedding=8", teacher, 0).model
    v, h, e = teacher.vocab_size, 32, 8
    block = sum(p.numel() for p in find_blocks(plain)[0].parameters())
    norm = plain.model.norm.weight.numel()
    assert count(albert) == v * e + e * h + h * e + block + norm
    assert count(plain) == 4 * block + norm + v * h * (1 if plain.config.tie_word_embeddings else 2)
    blocks = find_blocks(albert)
    assert all(isinstance(b, SharedBlock) and b.block is blocks[0].block for b in blocks)
    two = build_student("teacher:layers=4,hidden=32,share=2", teacher, 0).model
    assert count(two) == 2 * block + norm + count(plain) - 4 * block - norm  # embeddings untouched
    with pytest.raises(UserError, match="take integers"):
        build_student("teacher:layers=4,albert=yes", teacher, 0)
    # each position is its own layer to the hooks, and the plain export computes the same function
    ids = torch.randint(0, v, (2, 12), generator=torch.Generator().manual_seed(0))
    albert.eval()
    exported = export(albert).eval()
    with torch.no_grad(), Capture(albert, [1, 2, 3], [1, 2], "probs") as a, Capture(exported, [1, 2, 3], [1, 2],
                                                                                     "probs") as b:
        torch.testing.assert_close(albert(input_ids=ids, use_cache=False).logits, exported(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
        for layer in (1, 2, 3):
            torch.testing.assert_close(a.hidden[layer], b.hidden[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.attention[2], b.attention[2], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a.attention[1], a.attention[2])
    assert count(exported) == count(plain)


@pytest.mark.parametrize("method,term", [("kd", "kd/kd"), ("tinybert:alpha_pred=0", "tinybert/hid")])
def test_albert_student_trains_and_saves_a_plain_model(method, term, layer_cache, tmp_path):
    out = tmp_path / "run"
    distill(DistillConfig(cache=[str(layer_cache)], student="teacher:layers=3,hidden=32,albert=1,embedding=16",
                          out=str(out), method=[method], steps=80, batch_size=4, lr=1e-2, eval_sequences=8,
                          quiet=True))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([x[term] for x in lines[-5:]]) < 0.8 * np.mean([x[term] for x in lines[1:6]])
    assert "ALBERT-style: 1 shared block(s) over 3 layers" in json.loads((out / "run.json").read_text())["student"]
    saved = transformers.AutoModelForCausalLM.from_pretrained(out / "student")
    assert type(saved).__name__ == "LlamaForCausalLM"
    again = evaluate_model(str(out / "student"), str(layer_cache), str(out), None, 4, "cpu")
    assert again["eval/kl_teacher"] == pytest.approx(lines[-1]["eval/kl_teacher"], rel=1e-4)
