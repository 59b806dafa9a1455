"""The arrays of a teacher cache, derived from its manifest: the one list that the writer creates,
the reader opens and `kdpipe verify` checks."""

from __future__ import annotations

from dataclasses import dataclass

from kdpipe.storage.manifest import Manifest


LEDGER = "ledger/done"
# the top-level entries a cache directory may hold (`--overwrite` replaces nothing else)
CACHE_ENTRIES = {"zarr.json", "tokens", "logits", "sampled", "hidden", "attention", "interchange", "ledger",
                 "classification", "tokenizer"}


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # the zarr dtype on disk
    preset: str
    logical_dtype: str | None = None  # what the stored bits mean when it differs, e.g. bfloat16 as uint16
    per_sequence: bool = True  # rows are sequences, written by work unit; else one chunk, written at creation


def id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def hidden_name(layer: int) -> str:
    return f"hidden/layer_{layer:03d}"


def attention_name(layer: int, part: str | None = None) -> str:
    return f"attention/layer_{layer:03d}" + (f"_{part}" if part else "")


def array_specs(m: Manifest) -> list[ArraySpec]:
    n, t = m.data.num_sequences, m.data.seq_len
    s, teacher = m.signals, m.teacher
    ids = id_dtype(teacher.vocab_size)
    specs = [
        ArraySpec("tokens/input_ids", (n, t), "int32", "ids"),
        ArraySpec("tokens/length", (n,), "int32", "raw"),
        *([ArraySpec("tokens/loss_mask", (n, t), "uint8", "ids")] if m.data.loss_mask else []),
    ]
    temps = len(s.temperatures)
    if m.compact_topk:  # storage.topk_codec
        specs += [ArraySpec("logits/topk_ids", (n, t, s.top_k), ids, "ranks"),
                  ArraySpec("logits/topk_values", (n, t, s.top_k), "uint8", "levels"),
                  ArraySpec("logits/id_table", (teacher.vocab_size,), ids, "ids", per_sequence=False),
                  ArraySpec("logits/logsumexp", (n, t, 1), "float32", "floats"),
                  *([ArraySpec("logits/lognorm", (n, t, temps - 1), "float16", "floats")] if temps > 1 else []),
                  ArraySpec("logits/logtail", (n, t, temps), "float16", "floats")]
    else:
        if s.top_k:  # --top-k 0: an importance-sampled cache, the draws alone
            specs += [ArraySpec("logits/topk_ids", (n, t, s.top_k), ids, "ids"),
                      ArraySpec("logits/topk_values", (n, t, s.top_k), "float16", "floats")]
        specs.append(ArraySpec("logits/logsumexp", (n, t, temps), "float32", "floats"))
        if s.logtail and s.top_k:
            specs.append(ArraySpec("logits/logtail", (n, t, temps), "float32", "floats"))
    if s.sample_count:
        draws = min(s.sample_count, teacher.vocab_size)  # at most V distinct ids can be drawn
        specs += [
            ArraySpec("sampled/ids", (n, t, draws), ids, "ids"),
            ArraySpec("sampled/counts", (n, t, draws), "uint16", "ids"),
        ]
        if s.sampled_logprobs:
            # -log p in steps of 1/16 nat (uint8): see storage.codecs.quantize_logprobs
            specs.append(ArraySpec("sampled/logprobs", (n, t, draws), "uint8", "ids"))
    for layer in s.hidden_layers:
        if s.hidden_dtype == "bfloat16":
            specs.append(ArraySpec(hidden_name(layer), (n, t, teacher.hidden_size), "uint16", "floats", "bfloat16"))
        else:
            specs.append(ArraySpec(hidden_name(layer), (n, t, teacher.hidden_size), "float16", "floats"))
    for layer in s.attention_layers:
        if s.attention_form == "probs":
            specs.append(ArraySpec(attention_name(layer), (n, teacher.num_heads, t, t), s.attention_dtype, "attention"))
        else:
            # grouped-query teachers keep their K/V heads: repeating them on read is exact and saves space
            for part, heads in (("q", teacher.num_heads), ("k", teacher.num_kv_heads), ("v", teacher.num_kv_heads)):
                specs.append(ArraySpec(attention_name(layer, part), (n, heads, t, teacher.head_dim), "float16", "floats"))
    for name, file_name, size in tokenizer_arrays(m):
        specs.append(ArraySpec(name, (size,), "uint8", "bytes", per_sequence=False))
    if s.interchange_layers:
        specs += [
            ArraySpec("interchange/source", (n,), "int32", "raw"),
            ArraySpec("interchange/layer", (n,), "int16", "raw"),
            ArraySpec("interchange/span", (n, 3), "int32", "raw"),
            ArraySpec("interchange/topk_ids", (n, t, s.top_k), ids, "ids"),
            ArraySpec("interchange/topk_values", (n, t, s.top_k), "float16", "floats"),
        ]
    return specs


def tokenizer_arrays(m: Manifest) -> list[tuple[str, str, int]]:
    """(array name, file name, bytes) of the tokenizer files the cache keeps, so that a student saved from
    it carries its teacher's tokenizer without reading any path the cache names."""
    return [(f"tokenizer/file_{i:03d}", name, size) for i, (name, size) in enumerate(sorted(m.tokenizer.files.items()))]


def ledger_spec(m: Manifest) -> ArraySpec:
    """One flag per work unit, set only after all of the unit's arrays are written."""
    return ArraySpec(LEDGER, (m.layout.num_units,), "uint8", "raw", per_sequence=False)


def unit_range(m: Manifest, unit: int) -> tuple[int, int]:
    """The sequences [start, stop) of one work unit."""
    per = m.layout.sequences_per_unit
    return unit * per, min((unit + 1) * per, m.data.num_sequences)
