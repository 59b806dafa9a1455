"""DIITO: interchange interventions fixed at extraction, the teacher's counterfactual top-k against a
direct intervention on the teacher, and the student's replay against a direct intervention on it."""

import json

import numpy as np
import pytest
import torch
import transformers

from kdpipe.errors import UserError
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.interchange import plan_unit
from kdpipe.stage2_distill.losses import bucket_kl
from kdpipe.stage2_distill.methods import Batch, StudentOutput
from kdpipe.stage2_distill.methods.diito import DIITO
from kdpipe.stage2_distill.trainer import DistillConfig, distill, student_runner
from kdpipe.storage.reader import TeacherCache
from test_gkd_layer_methods import ctx_for
from tiny import make_model, save_teacher


def intervened_logits(model, base_ids, layer, base_start, count, source_states):
    """The model on `base_ids` with block `layer`'s output replaced over [base_start, +count)."""
    def hook(module, args, output):
        h = (output if torch.is_tensor(output) else output[0]).clone()
        h[0, base_start:base_start + count] = source_states
        return h if torch.is_tensor(output) else (h, *output[1:])

    handle = model.model.layers[layer - 1].register_forward_hook(hook)
    try:
        return model(input_ids=base_ids).logits
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def diito_cache(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("diito")
    teacher = save_teacher(root / "teacher", "llama", sharpness=30)
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(root / "cache"), seq_len=32, top_k=16,
                          interchange_layers="1,2", interchange_rate=0.25, sequences_per_unit=4, quiet=True))
    return root


def test_plan_is_a_seeded_rotation_within_the_unit():
    lengths = np.array([32, 20, 32, 9])
    plan = plan_unit(0, 5, lengths, [1, 2], 0.25)
    again = plan_unit(0, 5, lengths, [1, 2], 0.25)
    assert all(np.array_equal(plan[k], again[k]) for k in plan)
    assert sorted(plan["source"]) == [0, 1, 2, 3] and all(plan["source"] != np.arange(4))
    assert set(plan["layer"]) <= {1, 2}
    for i, (base, source, count) in enumerate(plan["span"]):
        assert count == max(1, int(min(lengths[i], lengths[plan["source"][i]]) * 0.25))
        assert 0 <= base <= lengths[i] - count and 0 <= source <= lengths[plan["source"][i]] - count


def test_counterfactual_topk_equals_a_direct_intervention_on_the_teacher(diito_cache):
    cache = TeacherCache(diito_cache / "cache")
    s = cache.manifest.signals
    assert s.interchange_layers == [1, 2] and s.interchange_rate == 0.25
    teacher = transformers.AutoModelForCausalLM.from_pretrained(diito_cache / "teacher").eval()
    ic, ids = cache.interchange(), cache.input_ids().astype(np.int64)
    per = cache.manifest.layout.sequences_per_unit
    assert all(i // per == src // per for i, src in enumerate(ic["source"]))  # sources stay within the unit
    for i in (0, 5, 10):
        src, layer, (base_start, source_start, count) = int(ic["source"][i]), int(ic["layer"][i]), ic["span"][i]
        with torch.no_grad():
            states = teacher(input_ids=torch.from_numpy(ids[src:src + 1]), output_hidden_states=True).hidden_states
            logits = intervened_logits(teacher, torch.from_numpy(ids[i:i + 1]), layer, base_start, count,
                                       states[layer][0, source_start:source_start + count])
        want = torch.log_softmax(logits[0].double(), -1).topk(16, -1)
        assert (torch.from_numpy(ic["topk_ids"][i][:, :4]) == want.indices[:, :4]).float().mean() > 0.95
        np.testing.assert_allclose(ic["topk_logprobs"][i], want.values.numpy(), atol=2e-2, rtol=1e-3)
        # before the span the intervention cannot reach: the counterfactual equals the plain top-k
        plain_ids, plain_logp, _ = cache.topk_logprobs(slice(i, i + 1))
        # (the plain top-k is compact: the same ids, ordered by 8-bit levels, so equal levels may swap)
        np.testing.assert_array_equal(np.sort(ic["topk_ids"][i][:base_start], -1), np.sort(plain_ids[0, :base_start], -1))
        assert (ic["topk_ids"][i][:base_start, 0] == plain_ids[0, :base_start, 0]).all()
        if base_start + count < 32:  # after it, something changed
            assert not np.allclose(ic["topk_logprobs"][i][base_start + count:], plain_logp[0, base_start + count:])


def test_student_replays_the_cached_intervention():
    student = make_model("llama", 11, layers=3, hidden=16, heads=4).eval()
    method = DIITO({}, ctx_for(student_layers=3, student_hidden=16, teacher_layers=4))
    assert [method.student_layer(t) for t in (1, 2, 3)] == [1, 2, 2]
    g = torch.Generator().manual_seed(0)
    b, t = 2, 8
    ids, source_ids = torch.randint(0, 11, (b, t), generator=g), torch.randint(0, 11, (b, t), generator=g)
    t_logits = torch.randn(b, t, 11, generator=g)
    top = torch.log_softmax(t_logits, -1).topk(4, -1)
    ic = {"layer": torch.tensor([1, 3]), "span": torch.tensor([[2, 0, 3], [5, 4, 2]]), "source_ids": source_ids,
          "source_length": torch.tensor([t, t]), "topk_ids": top.indices, "topk_logprobs": top.values}
    batch = Batch(input_ids=ids, mask=torch.ones(b, t, dtype=torch.bool), interchange=ic)
    got = method.loss(batch, StudentOutput(logits=torch.zeros(b, t, 11), run=student_runner(student, False)), 0)
    want = []
    for r in range(b):
        layer = method.student_layer(int(ic["layer"][r]))
        base_start, source_start, count = (int(x) for x in ic["span"][r])
        states = student(input_ids=source_ids[r:r + 1], output_hidden_states=True).hidden_states[layer]
        want.append(intervened_logits(student, ids[r:r + 1], layer, base_start, count,
                                      states[0, source_start:source_start + count]))
    reached = torch.arange(t)[None, :] >= ic["span"][:, :1]
    torch.testing.assert_close(got["causal"], bucket_kl(torch.cat(want), top.indices, top.values, 1.0, reached),
                               rtol=1e-5, atol=1e-6)


def test_diito_loss_falls_and_a_cache_without_interventions_names_the_flag(diito_cache, layer_cache, tmp_path):
    distill(DistillConfig(cache=[str(diito_cache / "cache")], student="teacher:layers=2,hidden=16",
                          out=str(tmp_path / "run"), method=["diito"], steps=40, batch_size=4, lr=1e-2,
                          eval_sequences=8, quiet=True))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    first, last = np.mean([x["diito/causal"] for x in lines[:5]]), np.mean([x["diito/causal"] for x in lines[-5:]])
    assert last < 0.8 * first, (first, last)
    with pytest.raises(UserError, match="--interchange 2"):
        distill(DistillConfig(cache=[str(layer_cache)], student="teacher:layers=2", out=str(tmp_path / "r2"),
                              method=["diito"], steps=1, quiet=True))
