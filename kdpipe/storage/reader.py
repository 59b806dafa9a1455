"""Typed read access to a teacher cache, by signal and layer, and dask arrays for whole-cache analysis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from kdpipe.errors import UserError
from kdpipe.storage.attention import attention_probs
from kdpipe.storage.codecs import dequantize_logprobs
from kdpipe.storage import sampled_codec, topk_codec
from kdpipe.storage.integrity import DamagedCache, open_array, read_rows, schema_problem
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.codes import Codecs, read_codecs, read_signal_rows
from kdpipe.storage.schema import (LEDGER, array_specs, attention_name, hidden_name, ledger_spec, positions_problem,
                                   tokenizer_arrays)
from kdpipe.storage.signal_codec import dequantize
from kdpipe.storage.writer import group_attrs

Index = slice | np.ndarray | list[int]


class TeacherCache:
    """An opened teacher cache. Refuses an incomplete store unless `allow_partial`, and a store whose
    arrays do not match its manifest; reads refuse missing or damaged chunks (storage.integrity)."""

    def __init__(self, path: str | Path, allow_partial: bool = False, check: bool = True):
        self.path = str(path)
        if not Path(path).exists():
            raise UserError(f"no teacher cache at {path}: run `kdpipe extract --out {path}` first")
        if not (Path(path) / "zarr.json").exists():
            raise UserError(f"{path} is not a kdpipe teacher cache (no zarr.json)")
        self.manifest = Manifest.from_dict(group_attrs(self.path).get("kdpipe"), where=self.path)
        self.group = zarr.open_group(self.path, mode="r")
        self._arrays: dict[str, zarr.Array] = {}
        self._codecs: Codecs | None = None
        self._signal_row: np.ndarray | None = None
        if check:
            for spec in array_specs(self.manifest) + [ledger_spec(self.manifest)]:
                problem = schema_problem(self.array(spec.name), spec)
                if problem:
                    raise DamagedCache(f"{path} does not match its manifest ({problem}): re-extract it with "
                                       f"--overwrite")
        done = self.units_done()
        if self.manifest.complete and not done.all():
            undone = np.flatnonzero(~done).tolist()
            raise DamagedCache(f"{path} says it is complete but work units {undone[:5]} are not marked done (a "
                               f"damaged ledger): run `kdpipe verify --repair {path}`, then `kdpipe extract --resume`")
        if not self.manifest.complete and not allow_partial:
            raise UserError(f"{path} is incomplete ({int(done.sum())}/{len(done)} work units done): finish it with "
                            f"`kdpipe extract --resume`, or pass --allow-partial to use the done units")

    # -- shape of the data --------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return self.manifest.data.num_sequences

    @property
    def seq_len(self) -> int:
        return self.manifest.data.seq_len

    def units_done(self) -> np.ndarray:
        """One flag per work unit, read from the ledger in one go (a missing flag chunk reads as not done)."""
        return np.asarray(self.array(LEDGER)[:]).astype(bool)

    def progress(self) -> tuple[int, int]:
        done = self.units_done()
        return int(done.sum()), len(done)

    def done_sequences(self) -> np.ndarray:
        """Indices of sequences whose work unit is complete."""
        per = self.manifest.layout.sequences_per_unit
        done = self.units_done()
        ids = np.arange(self.num_sequences)
        return ids[done[ids // per]]

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = open_array(self.group, name, self.path)
        return self._arrays[name]

    def _read(self, name: str, index: Index) -> np.ndarray:
        return read_rows(self.array(name), name, index, self.path)

    # -- signals ------------------------------------------------------------------------------
    def input_ids(self, index: Index = slice(None)) -> np.ndarray:
        return self._read("tokens/input_ids", index)

    def lengths(self, index: Index = slice(None)) -> np.ndarray:
        return self._read("tokens/length", index)

    def loss_mask(self, index: Index = slice(None)) -> np.ndarray | None:
        """Chat data: 1 on the tokens a student learns; None when every token is."""
        return self._read("tokens/loss_mask", index).astype(bool) if self.manifest.data.loss_mask else None

    def topk(self, index: Index = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64, raw logits float32, logsumexp float32 [.., n_temps]) of the teacher's top-k."""
        ids, logprobs, lse = self.topk_logprobs(index)
        return ids, logprobs + lse[..., :1], lse

    def topk_logprobs(self, index: Index = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64, exact teacher log-probabilities at T=1 float32, logsumexp float32 [.., n_temps]).
        At another stored temperature T: log p_T = raw / T - logsumexp[.., temperature_index(T)]."""
        if not self.manifest.signals.top_k:
            raise UserError(f"{self.path} is an importance-sampled cache (--top-k 0): it has no top-k logits; use "
                            f"kd:estimator=sampled, or re-extract with --top-k 64")
        if self.manifest.compact_topk:  # within signals.topk_error nats, scaled to the stored mass 1 - tail
            tail = self.logtail(index)
            ids, logprobs = topk_codec.decode(self._read("logits/topk_ids", index),
                                              self._read("logits/topk_values", index), self.id_table(), tail[..., 0])
        else:
            ids = self._read("logits/topk_ids", index).astype(np.int64)
            logprobs = self._read("logits/topk_values", index).astype(np.float32)
        return ids, logprobs, self.logsumexp(index)

    def codecs(self) -> Codecs:
        """The codes the cache was encoded with (storage.codes), read and checked once."""
        if self._codecs is None:
            self._codecs = read_codecs(self.group, self.manifest, self.path)
        return self._codecs

    def id_table(self) -> np.ndarray:
        """The compact top-k's rank -> id table (storage.topk_codec)."""
        return self.codecs().id_table

    def logsumexp(self, index: Index = slice(None)) -> np.ndarray:
        """The teacher's full-vocabulary logsumexp per stored temperature, float32 [.., n_temps]."""
        lse = self._read("logits/logsumexp", index)
        temps = self.manifest.signals.temperatures
        if self.manifest.compact_normalizers and len(temps) > 1:  # T=1 stored whole, the others as log sum p^(1/T)
            rest = lse / np.asarray(temps[1:], np.float32) + self._read("logits/lognorm", index).astype(np.float32)
            lse = np.concatenate([lse, rest], -1)
        return lse

    def logtail(self, index: Index = slice(None)) -> np.ndarray | None:
        """The teacher's log-mass outside its top-k, per stored temperature, float32 [.., n_temps]; None for
        caches written before kdpipe 0.2 (the losses then recover it from the top-k, exact above ~1e-4)."""
        s = self.manifest.signals
        return self._read("logits/logtail", index).astype(np.float32) if s.logtail and s.top_k else None

    def tokenizer_files(self) -> dict[str, bytes]:
        """The teacher tokenizer's files (name: bytes) as extraction saved them; {} for caches that predate it."""
        return {file_name: self._read(name, slice(None)).tobytes()
                for name, file_name, _ in tokenizer_arrays(self.manifest)}

    def temperature_index(self, temperature: float) -> int:
        temps = self.manifest.signals.temperatures
        for i, t in enumerate(temps):
            if abs(t - temperature) < 1e-9:
                return i
        raise UserError(f"temperature {temperature:g} is not stored in {self.path} (stored: "
                        f"{', '.join(f'{t:g}' for t in temps)}); the top-k tail cannot be renormalized exactly "
                        f"at another temperature: re-extract with --temperatures")

    def sampled(self, index: Index = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, counts int64): unique draws from the teacher distribution by count, descending, padded
        with id 0 and count 0."""
        return self.draws(index, logprobs=False)[:2]

    def sampled_logprobs(self, index: Index = slice(None)) -> np.ndarray | None:
        """The teacher's T=1 log-probabilities of the sampled ids, float32, within LOGPROB_STEP / 2 nats down to
        -LOGPROB_FLOOR (a draw below it, p < 1.2e-7, reads as the floor); None for caches before kdpipe 0.2."""
        return self.draws(index)[2]

    def draws(self, index: Index = slice(None), logprobs: bool = True):
        """(ids, counts, log-probabilities or None) of the draws, as sampled() and sampled_logprobs(), in one read."""
        s = self.manifest.signals
        if not s.sample_count:
            raise UserError(f"{self.path} has no sampled logits: re-extract with --sample-count M")
        ids, counts = self._read("sampled/ids", index), self._read("sampled/counts", index)
        codes = self._read("sampled/logprobs", index) if logprobs and s.sampled_logprobs else None
        if self.manifest.compact_sampled:  # rank order on disk: read back by count
            ids, counts, codes = sampled_codec.decode(ids, counts, codes, self.id_table())
        return (ids.astype(np.int64), counts.astype(np.int64),
                None if codes is None else dequantize_logprobs(codes))

    def interchange(self, index: Index = slice(None)) -> dict[str, np.ndarray]:
        """DIITO's interventions: source (sequence id), layer (teacher), span (base start, source start,
        length) and the counterfactual top-k ids (int64) and log-probabilities at T=1 (float32)."""
        if not self.manifest.signals.interchange_layers:
            raise UserError(f"{self.path} has no interchange interventions: re-extract with --interchange LAYERS")
        return {"source": self._read("interchange/source", index).astype(np.int64),
                "layer": self._read("interchange/layer", index).astype(np.int64),
                "span": self._read("interchange/span", index).astype(np.int64),
                "topk_ids": self._read("interchange/topk_ids", index).astype(np.int64),
                "topk_logprobs": self._read("interchange/topk_values", index).astype(np.float32)}

    # -- hidden states and attention: every sequence's, or, subsampled, those of `tokens/signal_row` --------
    def signal_rows(self, index: Index = slice(None)) -> np.ndarray:
        """For the given sequences, their rows in the hidden-state and attention arrays (-1: the sequence carries
        none, in a cache that stores them for `signals.signal_sequences` of every unit's sequences)."""
        if not self.manifest.subsampled:
            return np.arange(self.num_sequences)[index]
        if self._signal_row is None:
            self._signal_row = read_signal_rows(self.group, self.manifest, self.path)
        return self._signal_row[index]

    def _signal_index(self, index: Index, what: str) -> Index:
        if not self.manifest.subsampled:
            return index
        rows = self.signal_rows(index)
        if (rows < 0).any():
            seq = np.arange(self.num_sequences)[index][rows < 0][0]
            raise UserError(f"sequence {seq} of {self.path} carries no {what}: the cache stores them for "
                            f"{self.manifest.signal_rows} of every {self.manifest.layout.sequences_per_unit} "
                            f"sequences (signal_rows() says which)")
        return rows

    def signal_positions(self, index: Index = slice(None)) -> np.ndarray | None:
        """[n, P] int64: the positions of the given sequences whose hidden states and attention the cache holds
        (what the time axis of hidden() and attention_factors() is), checked; None when it holds every position."""
        if not self.manifest.position_subsampled:
            return None
        pos = self._read("tokens/signal_positions", self._signal_index(index, "hidden states and attention"))
        problem = positions_problem(self.manifest, pos.astype(np.int64))
        if problem:
            raise DamagedCache(f"{self.path}: {problem}: re-extract it with --overwrite")
        return pos.astype(np.int64)

    def hidden(self, layer: int, index: Index = slice(None)) -> np.ndarray:
        """Hidden states [n, T, H] float32 of the given sequences, decoded (storage.signal_codec) when compressed;
        [n, P, H] at signal_positions() from a position-subsampled cache."""
        s = self.manifest.signals
        if layer not in s.hidden_layers:
            raise UserError(f"{self.path} has no hidden states of layer {layer} (stored: "
                            f"{s.hidden_layers}): re-extract with --hidden-layers")
        rows = self._signal_index(index, "hidden states")
        raw = self._read(hidden_name(layer), rows)
        if s.hidden_codec == "int8":
            step = self._read(f"{hidden_name(layer)}_step", rows)
            return self.codecs().hidden[layer].decode(torch.from_numpy(raw), torch.from_numpy(step)).numpy()
        if s.hidden_dtype == "bfloat16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy()
        return raw.astype(np.float32)

    def attention_factors(self, layer: int, index: Index = slice(None)) -> tuple[np.ndarray, ...]:
        """Post-RoPE (q, k, v) [n, heads, T or P, d] of block `layer`; k, v keep the teacher's grouped-query heads."""
        self._check_attention(layer, "factors")
        rows = self._signal_index(index, "attention")
        out = []
        for part in "qkv":
            raw = self._read(attention_name(layer, part), rows)
            if self.manifest.signals.attention_rank:  # projected per head: back to head_dim by its decoder
                step = self._read(f"{attention_name(layer, part)}_step", rows)
                raw = self.codecs().factors[layer, part].decode(torch.from_numpy(raw), torch.from_numpy(step)).numpy()
            elif self.manifest.signals.attention_codec == "int8":
                raw = dequantize(raw, self._read(f"{attention_name(layer, part)}_step", rows)).numpy()
            out.append(raw.astype(np.float32))
        return tuple(out)

    def attention_probs(self, layer: int, index: Index = slice(None)) -> np.ndarray:
        """Post-softmax attention [n, h, T, T] of block `layer`, stored or recomputed exactly from factors; from a
        position-subsampled cache [n, h, P, P], the attention among signal_positions()."""
        s = self.manifest.signals
        if s.attention_form == "probs":
            self._check_attention(layer, "probs")
            raw = self._read(attention_name(layer), self._signal_index(index, "attention"))
            return raw.astype(np.float32) / 255.0 if s.attention_dtype == "uint8" else raw.astype(np.float32)
        q, k, _ = self.attention_factors(layer, index)
        lengths = None if self.manifest.data.packing == "packed" else torch.from_numpy(self.lengths(index))
        pos = self.signal_positions(index)
        probs = attention_probs(torch.from_numpy(q), torch.from_numpy(k), s.attention_scaling,
                                self.manifest.teacher.causal, lengths, self.manifest.window(layer),
                                s.attention_softcap, None if pos is None else torch.from_numpy(pos))
        return probs.numpy()

    def _check_attention(self, layer: int, form: str) -> None:
        s = self.manifest.signals
        if layer not in s.attention_layers or (form == "factors" and s.attention_form != "factors"):
            raise UserError(f"{self.path} has no attention {form} of layer {layer} (stored: {s.attention_form} "
                            f"of {s.attention_layers}): re-extract with --attention-layers/--attention-form")

    # -- whole-cache analysis -----------------------------------------------------------------
    def topk_logprobs_dask(self):
        """The T=1 top-k log-probabilities [N, T, k] as a dask array (decoded from a compact cache)."""
        values = self.dask("logits/topk_values")
        if not self.manifest.compact_topk:
            return values
        import dask.array as da

        table = self.id_table()
        return da.map_blocks(lambda s, q, t: topk_codec.decode(s, q, table, t[..., 0])[1], self.dask("logits/topk_ids"),
                             values, self.dask("logits/logtail"), dtype=np.float32, chunks=values.chunks)

    def dask(self, name: str):
        """A dask array over one stored array, chunked along whole shards (dask needs shard alignment)."""
        import dask.array as da

        arr = self.array(name)
        rows = arr.shards[0] if arr.shards else arr.chunks[0]
        return da.from_zarr(arr, chunks=(rows,) + arr.shape[1:])
