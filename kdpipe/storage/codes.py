"""The codes a cache is encoded with, fitted once at extraction (stage1_extract.calibrate) and stored beside
the signals: the compact top-k's rank table, each int8 hidden layer's channel code and projection, each projected
attention layer's Q/K/V codes. Written when
the store is created; read, and checked like every input, by the extractor's ranks, a resumed run and the reader."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from kdpipe.storage.integrity import DamagedCache, open_array, read_rows
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.schema import attention_name, hidden_name, signal_row_problem
from kdpipe.storage.signal_codec import FactorCodec, HiddenCodec

PARTS = ("q", "k", "v")


@dataclass
class Codecs:
    id_table: np.ndarray | None = None  # rank -> token id (a permutation of the vocabulary)
    hidden: dict[int, HiddenCodec] = field(default_factory=dict)  # int8 hidden layer -> its code
    factors: dict[tuple[int, str], FactorCodec] = field(default_factory=dict)  # (attention layer, "q"/"k"/"v")


def write_codecs(group: zarr.Group, m: Manifest, codecs: Codecs, writable) -> None:
    if m.ranked_ids:
        writable(group, "logits/id_table")[:] = codecs.id_table
    if m.signals.hidden_codec == "int8":
        for layer in m.signals.hidden_layers:
            for suffix, values in codecs.hidden[layer].arrays().items():
                writable(group, f"{hidden_name(layer)}_{suffix}")[:] = values
    if m.signals.attention_rank:
        for layer in m.signals.attention_layers:
            for part in PARTS:
                for suffix, values in codecs.factors[layer, part].arrays().items():
                    writable(group, f"{attention_name(layer, part)}_{suffix}")[:] = values


def read_codecs(group: zarr.Group, m: Manifest, where: str) -> Codecs:
    def read(name: str) -> np.ndarray:
        return read_rows(open_array(group, name, where), name, slice(None), where)

    out = Codecs()
    if m.ranked_ids:
        table = read("logits/id_table").astype(np.int64)
        if not np.array_equal(np.sort(table), np.arange(len(table))):  # a cache is input: every id once
            raise DamagedCache(f"{where}: logits/id_table is not a permutation of the vocabulary: re-extract it with "
                               f"--overwrite")
        out.id_table = table
    if m.signals.hidden_codec == "int8":
        for layer in m.signals.hidden_layers:
            name = hidden_name(layer)
            affine = read(f"{name}_affine")
            basis = read(f"{name}_basis") if m.signals.hidden_rank else None
            if not (np.isfinite(affine).all() and (affine[1] > 0).all()
                    and (basis is None or np.isfinite(basis).all())):
                raise DamagedCache(f"{where}: the code of {name} ({name}_affine / _basis) is not finite with positive "
                                   f"scales: re-extract it with --overwrite")
            out.hidden[layer] = HiddenCodec.from_arrays(affine, basis)
    if m.signals.attention_rank:
        for layer in m.signals.attention_layers:
            for part in PARTS:
                name = attention_name(layer, part)
                arrays = [read(f"{name}_{suffix}") for suffix in ("center", "encoder", "decoder")]
                if not all(np.isfinite(a).all() for a in arrays):
                    raise DamagedCache(f"{where}: the code of {name} ({name}_center / _encoder / _decoder) is not "
                                       f"finite: re-extract it with --overwrite")
                out.factors[layer, part] = FactorCodec.from_arrays(*arrays)
    return out


def read_signal_rows(group: zarr.Group, m: Manifest, where: str) -> np.ndarray | None:
    """`tokens/signal_row` of a subsampled cache (checked against the manifest's layout); None when every
    sequence carries hidden states and attention."""
    if not m.subsampled:
        return None
    rows = read_rows(open_array(group, "tokens/signal_row", where), "tokens/signal_row", slice(None), where)
    problem = signal_row_problem(m, rows.astype(np.int64))
    if problem:
        raise DamagedCache(f"{where}: {problem}: re-extract it with --overwrite")
    return rows.astype(np.int64)
