"""The arrays of a teacher cache, derived from its manifest: the one list that the writer creates,
the reader opens and `kdpipe verify` checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kdpipe.storage.manifest import Manifest
from kdpipe.storage.sampled_codec import count_dtype


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
    unit_rows: int | None = None  # rows each work unit owns, one chunk a unit (signal rows); None: its sequences


def id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def hidden_name(layer: int) -> str:
    return f"hidden/layer_{layer:03d}"


def attention_name(layer: int, part: str | None = None) -> str:
    return f"attention/layer_{layer:03d}" + (f"_{part}" if part else "")


def unit_signal_rows(m: Manifest, unit: int) -> int:
    """How many of work unit `unit`'s sequences carry hidden states and attention (the last unit, if short,
    in proportion, at least one)."""
    a, b = unit_range(m, unit)
    if not m.subsampled:
        return b - a
    return max(1, math.ceil((b - a) * m.signal_rows / m.layout.sequences_per_unit))


def signal_row_range(m: Manifest, unit: int) -> tuple[int, int]:
    """The rows [start, stop) of the signal arrays that work unit `unit` owns."""
    if not m.subsampled:
        return unit_range(m, unit)
    start = unit * m.signal_rows
    return start, start + unit_signal_rows(m, unit)


def signal_selection(m: Manifest, unit: int) -> np.ndarray:
    """The positions within work unit `unit` of the sequences that carry hidden states and attention: all, or
    a seeded draw of unit_signal_rows of them (a function of (seed, unit): the same on every rank and resume)."""
    a, b = unit_range(m, unit)
    rows = unit_signal_rows(m, unit)
    if rows == b - a:
        return np.arange(b - a)
    return np.sort(np.random.default_rng([m.signals.seed, unit, 5167]).choice(b - a, rows, replace=False))


def signal_row_problem(m: Manifest, rows: np.ndarray) -> str | None:
    """Why a stored `tokens/signal_row` cannot be this manifest's (each unit's sequences must map, in order, onto
    exactly the unit's rows), or None. Checked without redrawing: the draw is numpy's, whose streams may change."""
    if rows.shape != (m.data.num_sequences,):
        return f"tokens/signal_row has shape {rows.shape}"
    for unit in range(m.layout.num_units):
        a, b = unit_range(m, unit)
        start, stop = signal_row_range(m, unit)
        mine = rows[a:b][rows[a:b] >= 0]
        if not np.array_equal(mine, np.arange(start, stop)) or ((rows[a:b] < 0) & (rows[a:b] != -1)).any():
            return f"tokens/signal_row of work unit {unit} is not its rows {start}..{stop - 1}"
    return None


def draw_positions(m: Manifest, unit: int, lengths: np.ndarray) -> np.ndarray:
    """[n, P] int64: the positions of work unit `unit`'s sequences (of these lengths) that carry hidden states and
    attention: S contiguous spans (`signals.position_spans`; 0: P spans of one position), each at a uniform
    offset within its own S-th of [0, length), so ascending, distinct and spread over the whole sequence (a
    function of (seed, unit, lengths): the same on every rank and resume). A sequence shorter than P keeps
    every position, then padding positions that its length masks."""
    p, t = m.signal_positions, m.data.seq_len
    spans = m.signals.position_spans or p
    lengths = np.asarray(lengths, np.int64)[:, None]
    u = np.random.default_rng([m.signals.seed, unit, 8111]).random((len(lengths), p))[:, :spans]
    ends = np.arange(spans + 1) * p // spans  # span i holds positions ends[i]..ends[i+1]-1 of the P
    width = np.diff(ends)
    edges = ends[None, :] * np.maximum(lengths, p) // p  # span i's stratum, at least `width[i]` long
    start = edges[:, :-1] + (u * (edges[:, 1:] - edges[:, :-1] - width + 1)).astype(np.int64)
    span_of = np.repeat(np.arange(spans), width)
    pos = start[:, span_of] + (np.arange(p) - ends[span_of])[None, :]
    return np.where(lengths >= p, pos, np.arange(p)[None, :]).clip(0, t - 1)


def positions_dtype(m: Manifest) -> str:
    """`tokens/signal_positions`' dtype: int16 holds the positions of sequences below 32,768 tokens."""
    return "int16" if m.data.seq_len < 2 ** 15 else "int32"


def positions_problem(m: Manifest, pos: np.ndarray) -> str | None:
    """Why stored `tokens/signal_positions` rows cannot be this manifest's (each row P ascending positions in
    [0, T)), or None: a cache is input, and the positions index the student's states."""
    if pos.ndim != 2 or pos.shape[1] != m.signal_positions:
        return f"tokens/signal_positions has shape {pos.shape}, not [rows, {m.signal_positions}]"
    if len(pos) and ((pos < 0).any() or (pos >= m.data.seq_len).any() or (np.diff(pos, axis=1) <= 0).any()):
        return f"tokens/signal_positions holds positions outside 0..{m.data.seq_len - 1} or not ascending"
    return None


def signal_row_index(m: Manifest) -> np.ndarray:
    """`tokens/signal_row`: for every sequence, its row in the signal arrays, or -1."""
    out = np.full(m.data.num_sequences, -1, np.int32)
    for unit in range(m.layout.num_units):
        a, _ = unit_range(m, unit)
        start, stop = signal_row_range(m, unit)
        out[a + signal_selection(m, unit)] = np.arange(start, stop)
    return out


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
                  ArraySpec("logits/topk_values", (n, t, s.top_k), "uint8", "levels")]
    elif s.top_k:  # (with --top-k 0, an importance-sampled cache, the draws alone)
        specs += [ArraySpec("logits/topk_ids", (n, t, s.top_k), ids, "ids"),
                  ArraySpec("logits/topk_values", (n, t, s.top_k), "float16", "floats")]
    if m.ranked_ids:
        specs.append(ArraySpec("logits/id_table", (teacher.vocab_size,), ids, "ids", per_sequence=False))
    if m.compact_normalizers:
        specs += [ArraySpec("logits/logsumexp", (n, t, 1), "float32", "normalizers"),
                  *([ArraySpec("logits/lognorm", (n, t, temps - 1), "float16", "normalizers")] if temps > 1 else [])]
    else:
        specs.append(ArraySpec("logits/logsumexp", (n, t, temps), "float32", "floats"))
    if m.compact_topk:
        specs.append(ArraySpec("logits/logtail", (n, t, temps), "float16", "normalizers"))
    elif s.logtail and s.top_k:
        specs.append(ArraySpec("logits/logtail", (n, t, temps), "float32", "floats"))
    if s.sample_count:
        draws = min(s.sample_count, teacher.vocab_size)  # at most V distinct ids can be drawn
        if m.compact_sampled:  # storage.sampled_codec: rank gaps, uint8 counts
            specs += [ArraySpec("sampled/ids", (n, t, draws), ids, "ranks"),
                      ArraySpec("sampled/counts", (n, t, draws), np.dtype(count_dtype(s.sample_count)).name, "levels")]
        else:
            specs += [ArraySpec("sampled/ids", (n, t, draws), ids, "ids"),
                      ArraySpec("sampled/counts", (n, t, draws), "uint16", "ids")]
        if s.sampled_logprobs:
            # -log p in steps of 1/16 nat (uint8): see storage.codecs.quantize_logprobs
            specs.append(ArraySpec("sampled/logprobs", (n, t, draws), "uint8",
                                   "levels" if m.compact_sampled else "ids"))
    specs += signal_specs(m)
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


def signal_specs(m: Manifest) -> list[ArraySpec]:
    """Hidden states and attention, with their codecs' arrays (storage.signal_codec). Subsampled, their rows are
    the signal rows (`tokens/signal_row`), unit_rows of them per work unit; position-subsampled, their time axis
    is the P positions of `tokens/signal_positions`."""
    s, teacher, t, h = m.signals, m.teacher, m.data.seq_len, m.teacher.hidden_size
    if not (s.hidden_layers or s.attention_layers):
        return []
    n = m.data.num_sequences
    unit_rows = None
    specs = []
    if m.subsampled:
        n = signal_row_range(m, m.layout.num_units - 1)[1]
        unit_rows = m.signal_rows
        specs.append(ArraySpec("tokens/signal_row", (m.data.num_sequences,), "int32", "raw"))
    rows = dict(unit_rows=unit_rows)
    if m.position_subsampled:  # hidden states and attention at P positions of each sequence (draw_positions)
        t = m.signal_positions
        specs.append(ArraySpec("tokens/signal_positions", (n, t), positions_dtype(m), "raw", **rows))
    for layer in s.hidden_layers:
        name = hidden_name(layer)
        if s.hidden_codec == "int8":
            width = s.hidden_rank or h
            specs += [ArraySpec(name, (n, t, width), "int8", "int8", **rows),
                      ArraySpec(f"{name}_step", (n, t), "float16", "floats", **rows),
                      ArraySpec(f"{name}_affine", (2, h), "float32", "bytes", per_sequence=False)]
            if s.hidden_rank:
                specs.append(ArraySpec(f"{name}_basis", (h, width), "float32", "bytes", per_sequence=False))
        elif s.hidden_dtype == "bfloat16":
            specs.append(ArraySpec(name, (n, t, h), "uint16", "floats", "bfloat16", **rows))
        else:
            specs.append(ArraySpec(name, (n, t, h), "float16", "floats", **rows))
    for layer in s.attention_layers:
        if s.attention_form == "probs":
            specs.append(ArraySpec(attention_name(layer), (n, teacher.num_heads, t, t), s.attention_dtype, "attention",
                                   **rows))
            continue
        # grouped-query teachers keep their K/V heads: repeating them on read is exact and saves space
        for part, heads in (("q", teacher.num_heads), ("k", teacher.num_kv_heads), ("v", teacher.num_kv_heads)):
            name = attention_name(layer, part)
            if s.attention_codec == "int8":
                width = s.attention_rank or teacher.head_dim
                specs += [ArraySpec(name, (n, heads, t, width), "int8", "int8", **rows),
                          ArraySpec(f"{name}_step", (n, heads, t), "float16", "floats", **rows)]
                if s.attention_rank:  # its FactorCodec: per head a center, an encoder and a decoder
                    specs += [ArraySpec(f"{name}_center", (heads, teacher.head_dim), "float32", "bytes",
                                        per_sequence=False)]
                    specs += [ArraySpec(f"{name}_{a}", (heads, teacher.head_dim, width), "float32", "bytes",
                                        per_sequence=False) for a in ("encoder", "decoder")]
            else:
                specs.append(ArraySpec(name, (n, heads, t, teacher.head_dim), "float16", "floats", **rows))
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
