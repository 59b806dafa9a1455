"""The cache format: manifest validation, ledger and completeness, checksums, resume, dask, bit-rounding."""

import json

import numpy as np
import pytest
import zarr

from kdpipe.errors import UserError
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.storage.codecs import bitround
from kdpipe.storage.manifest import VERSION
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.verify import verify
from kdpipe.storage.writer import LEDGER
from test_cli import assert_user_error, kdpipe


def make_cache(teacher, corpus, out, **kw):
    cfg = dict(teacher=str(teacher), data=[str(corpus)], out=str(out), seq_len=32, top_k=8, sample_count=4,
               hidden_layers="0,3", sequences_per_unit=8, quiet=True)
    cfg.update(kw)
    return extract(ExtractConfig(**cfg))


def arrays_of(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[:]) for name, arr in group.arrays()} | {
        f"{g}/{name}": np.asarray(arr[:]) for g, sub in group.groups() for name, arr in sub.arrays()}


def test_manifest_of_unknown_version_or_damaged_is_refused(teachers, corpus, tmp_path):
    make_cache(teachers["llama"], corpus, tmp_path / "c")
    group = zarr.open_group(str(tmp_path / "c"), mode="r+")
    raw = dict(group.attrs["kdpipe"])
    group.attrs["kdpipe"] = raw | {"version": VERSION + 1}
    with pytest.raises(UserError, match=f"version {VERSION + 1}.*upgrade kdpipe"):
        TeacherCache(tmp_path / "c")
    group.attrs["kdpipe"] = {k: v for k, v in raw.items() if k != "signals"}
    with pytest.raises(UserError, match="damaged kdpipe manifest"):
        TeacherCache(tmp_path / "c")


def test_incomplete_cache_is_refused_then_resumed_bit_for_bit(teachers, corpus, tmp_path):
    make_cache(teachers["gpt2"], corpus, tmp_path / "whole")
    make_cache(teachers["gpt2"], corpus, tmp_path / "part")
    group = zarr.open_group(str(tmp_path / "part"), mode="r+")
    # a crash after unit 0: later units' flags unset, their data possibly half-written
    group[LEDGER][1:] = 0
    group["logits/topk_values"][8:] = 0
    group.attrs["kdpipe"] = dict(group.attrs["kdpipe"]) | {"complete": False}

    with pytest.raises(UserError, match=r"incomplete \(1/\d+ work units done\).*--resume"):
        TeacherCache(tmp_path / "part")
    partial = TeacherCache(tmp_path / "part", allow_partial=True)
    np.testing.assert_array_equal(partial.done_sequences(), np.arange(8))
    assert_user_error(kdpipe("verify", tmp_path / "part"), "incomplete", "--resume")

    result = make_cache(teachers["gpt2"], corpus, tmp_path / "part", resume=True)
    assert result.complete and result.sequences_written == TeacherCache(tmp_path / "whole").num_sequences - 8
    whole, resumed = arrays_of(tmp_path / "whole"), arrays_of(tmp_path / "part")
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], resumed[name], err_msg=name)


def test_verify_names_the_sequences_of_a_damaged_chunk_and_repair_resumes_them(teachers, corpus, tmp_path):
    out = tmp_path / "c"
    make_cache(teachers["llama"], corpus, out)
    before = arrays_of(out)
    chunk = out / "hidden" / "layer_003" / "c" / "1" / "0" / "0"  # sequences 8..15
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))

    report = verify(str(out))
    assert report.damaged_units == {1}
    assert any("hidden/layer_003: chunk of sequences 8..15 is damaged" in p for p in report.problems)
    assert_user_error(kdpipe("verify", out), "unit 1 (sequences 8..15)", "--repair")

    assert_user_error(kdpipe("verify", out, "--repair"), "ledger flags cleared")
    assert not TeacherCache(out, allow_partial=True).manifest.complete
    make_cache(teachers["llama"], corpus, out, resume=True)
    assert verify(str(out)).ok
    after = arrays_of(out)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_sharded_layout_reads_the_same(teachers, corpus, tmp_path):
    plain = make_cache(teachers["llama"], corpus, tmp_path / "plain").manifest
    sharded = make_cache(teachers["llama"], corpus, tmp_path / "sharded", sequences_per_chunk=2)
    assert sharded.manifest.data.fingerprint == plain.data.fingerprint
    assert zarr.open_array(str(tmp_path / "sharded" / "hidden" / "layer_003")).shards == (8, 32, 32)
    a, b = arrays_of(tmp_path / "plain"), arrays_of(tmp_path / "sharded")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    cache = TeacherCache(tmp_path / "sharded")
    lazy = cache.dask("logits/topk_values")
    assert lazy.chunks[0][0] == 8
    raw = np.asarray(cache.array("logits/topk_values")[:], dtype=np.float64)
    np.testing.assert_allclose(float(lazy.astype("float64").mean().compute()), raw.mean(), rtol=1e-9)


def test_bfloat16_hidden_states_and_lossy_bitrounding(teachers, corpus, tmp_path):
    exact = TeacherCache(make_cache(teachers["llama"], corpus, tmp_path / "a").path)
    bf16 = TeacherCache(make_cache(teachers["llama"], corpus, tmp_path / "b", hidden_dtype="bfloat16").path)
    lossy = TeacherCache(make_cache(teachers["llama"], corpus, tmp_path / "c", hidden_keepbits=4).path)
    ref = exact.hidden(3)
    np.testing.assert_allclose(bf16.hidden(3), ref, rtol=1e-2, atol=1e-2)
    arrays = json.loads(kdpipe("inspect", tmp_path / "b", "--json").stdout)["arrays"]
    assert next(a for a in arrays if a["name"] == "hidden/layer_003")["dtype"] == "bfloat16"
    rounded = lossy.hidden(3)
    assert np.all(np.abs(rounded - ref) <= np.abs(ref) * 2.0 ** -5 + 1e-7)
    assert not np.array_equal(rounded, ref)


def test_bitround_equals_round_half_even_of_the_mantissa():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 10).astype(np.float16)
    x = x[np.abs(x) > 1e-3]  # normal numbers
    for keep in (2, 5, 9):
        got = bitround(x.view(np.uint16), "float16", keep).view(np.float16).astype(np.float64)
        mant, exp = np.frexp(x.astype(np.float64))
        scale = 2.0 ** (keep + 1)
        want = np.ldexp(np.round(mant * scale) / scale, exp)
        np.testing.assert_array_equal(got, want)


def test_unit_temperature_is_always_stored_and_others_are_refused(teachers, corpus, tmp_path):
    cache = TeacherCache(make_cache(teachers["llama"], corpus, tmp_path / "c", temperatures=[2.0]).path)
    assert cache.manifest.signals.temperatures == [1.0, 2.0]
    assert cache.temperature_index(2.0) == 1
    with pytest.raises(UserError, match="temperature 3 is not stored.*stored: 1, 2"):
        cache.temperature_index(3.0)
