"""`kdpipe plan`: exact parameter and cache bytes against a real model and a real cache."""

import json

import numpy as np
import pytest
import transformers

from kdpipe.pipeline.plan import PlanConfig, make_plan, parse_size
from kdpipe.pipeline.report import cache_summary
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from test_cli import assert_user_error, kdpipe


@pytest.mark.parametrize("codec", ["compact", "float16"])
def test_plan_bytes_equal_a_real_model_and_cache(codec, teachers, corpus, tmp_path):
    signals = dict(top_k=8, sample_count=4, hidden_layers="0,2", attention_layers="all", attention_form="factors")
    extract(ExtractConfig(teacher=str(teachers["llama"]), data=[str(corpus)], out=str(tmp_path / "c"), seq_len=32,
                          temperatures=[1.0, 2.0], quiet=True, logit_codec=codec, **signals))
    summary = cache_summary(str(tmp_path / "c"))
    arrays = summary["arrays"]
    n = json.loads(kdpipe("inspect", tmp_path / "c", "--json").stdout)["manifest"]["data"]["num_sequences"]
    plan = make_plan(PlanConfig(str(teachers["llama"]), n * 32, 32, 4, 8, 2, codec, 4, "0,2", "all", "factors",
                                dtype="float32")).data
    assert plan["logits_mode"] == summary["logits_mode"] == f"{codec} top-k"
    model = transformers.AutoModelForCausalLM.from_pretrained(teachers["llama"])
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    assert plan["param_bytes"] == 4 * plan["params"]
    raw = {}
    for a in arrays:
        raw[a["name"].split("/")[0]] = raw.get(a["name"].split("/")[0], 0) + a["raw_bytes"]
    for group in ("tokens", "logits", "sampled", "hidden", "attention"):
        assert np.isclose(plan["cache_bytes"][group], raw[group], rtol=1e-12), group


@pytest.mark.parametrize("logprobs,sample_temperature", [(True, 1.0), (False, 1.0), (False, 2.0)])
def test_plan_bytes_equal_a_real_sampled_cache(logprobs, sample_temperature, teachers, corpus, tmp_path):
    """Draws alone, with or without their log-probabilities (then only the normalizers of T=1 and of the sampling
    temperature, where --temperatures lists it, are stored), counted through `kdpipe plan`'s own flags."""
    extract(ExtractConfig(teacher=str(teachers["llama"]), data=[str(corpus)], out=str(tmp_path / "c"), seq_len=32,
                          top_k=0, sample_count=12, temperatures=[1.0, 2.0], sample_logprobs=logprobs,
                          sample_temperature=sample_temperature, quiet=True))
    summary = cache_summary(str(tmp_path / "c"))
    n = summary["manifest"]["data"]["num_sequences"]
    flags = ["--no-sample-logprobs"] if not logprobs else []
    result = kdpipe("plan", "--teacher", teachers["llama"], "--tokens", str(n * 32), "--seq-len", "32",
                    "--batch-size", "4", "--top-k", "0", "--temperatures", "1,2", "--sample-count", "12",
                    "--sample-temperature", str(sample_temperature), "--dtype", "float32", "--json", *flags)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["logits_mode"] == summary["logits_mode"] == "sampled"
    raw = {}
    for a in summary["arrays"]:
        raw[a["name"].split("/")[0]] = raw.get(a["name"].split("/")[0], 0) + a["raw_bytes"]
    for group in ("logits", "sampled"):
        assert np.isclose(plan["cache_bytes"][group], raw[group], rtol=1e-12), group
    assert any(a["name"] == "sampled/logprobs" for a in summary["arrays"]) == logprobs
    lognorm = logprobs or sample_temperature != 1.0  # T=2's normalizer: kept to weight draws, or to train at T_s
    assert any(a["name"] == "logits/lognorm" for a in summary["arrays"]) == lognorm


def test_plan_for_a_100b_teacher_says_whether_it_fits_and_why():
    result = kdpipe("plan", "--teacher", "llama-100b", "--gpus", "8", "--gpu-memory", "40GB")
    assert result.exit_code == 0, result.output
    fits = next(line for line in result.stdout.splitlines() if line.startswith("fits"))
    assert "needs" in fits and "of 40.00 GB" in fits and "[estimate]" in fits
    small = kdpipe("plan", "--teacher", "llama-100b", "--gpus", "1", "--gpu-memory", "40GB")
    assert "NO:" in small.stdout and "--offload cpu|nvme" in small.stdout
    # one sequence per forward: streaming 194 GB of parameters per forward dominates; 8 sequences of 2048: compute
    one = kdpipe("plan", "--teacher", "llama-100b", "--gpus", "1", "--gpu-memory", "40GB", "--offload", "nvme",
                 "--batch-size", "1", "--json")
    data = json.loads(one.stdout)
    assert data["fits"] and data["bound"] == "parameter streaming"
    eight = json.loads(kdpipe("plan", "--teacher", "llama-100b", "--offload", "nvme", "--json").stdout)
    assert eight["bound"] == "compute"
    assert 95e9 < data["params"] < 105e9
    # ZeRO-3 over 8 GPUs gathers 7/8 of the parameters per forward: that time is there, and it bounds a small batch
    gather = json.loads(kdpipe("plan", "--teacher", "llama-100b", "--gpus", "8", "--batch-size", "1",
                               "--interconnect", "25GB/s", "--json").stdout)
    assert gather["seconds_by_term"]["all-gather between GPUs"] == pytest.approx(data["param_bytes"] * 7 / 8 / 25e9)
    assert gather["bound"] == "all-gather between GPUs"
    alone = json.loads(kdpipe("plan", "--teacher", "llama-100b", "--gpus", "1", "--json").stdout)
    assert alone["seconds_by_term"]["all-gather between GPUs"] == 0
    assert_user_error(kdpipe("plan", "--teacher", "gpt-5"), "not a config.json")
    assert parse_size("40GB") == 40e9 and parse_size("25GB/s") == 25e9 and parse_size("2GiB") == 2 * 2**30
