"""Running the teacher over one work unit, batch by batch, with capture, into numpy arrays.

A forward's outputs (`Captured`) are encoded into the cache's arrays apart from the forward, so the
calibration batches (stage1_extract.calibrate) are run once: their outputs are held and become the first
batches of unit 0 instead of being computed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdpipe.capture import Capture
from kdpipe.errors import UserError
from kdpipe.stage1_extract.interchange import interchange_edits, plan_unit, source_states
from kdpipe.stage1_extract.logits import HeadTap, LogitSignals, LogitSpec
from kdpipe.storage.codecs import bitround, quantize_logprobs
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.attention import gather_time
from kdpipe.storage.schema import attention_name, draw_positions, hidden_name, id_dtype, positions_dtype
from kdpipe.storage.codes import Codecs
from kdpipe.storage.signal_codec import FactorCodec, HiddenCodec, quantize
from kdpipe.storage.sampled_codec import encode as encode_sampled
from kdpipe.storage.topk_codec import encode as encode_topk, ranks_of

LOGIT_FIELDS = ("topk_ids", "topk_values", "logsumexp", "logtail", "sampled_ids", "sampled_counts",
                "sampled_logprobs")


@dataclass
class Captured:
    """One forward over rows of a unit: the logit signals, and the captured hidden states and attention."""
    rows: range
    logits: dict[str, torch.Tensor]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor | tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def to(self, device) -> "Captured":
        move = (lambda x: tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device))  # noqa: E731
        return Captured(self.rows, {k: move(v) for k, v in self.logits.items()},
                        {k: move(v) for k, v in self.hidden.items()}, {k: move(v) for k, v in self.attention.items()})


class UnitRunner:
    """Runs the teacher over one work unit, batch by batch, and returns its arrays as numpy."""

    def __init__(self, model, manifest: Manifest, spec: LogitSpec, batch_size: int):
        self.model, self.m, self.batch_size = model, manifest, batch_size
        self.signals = LogitSignals(spec)
        s = manifest.signals
        # interchange layers are captured too: their states are the sources of DIITO's interventions
        hidden = sorted(set(s.hidden_layers) | set(s.interchange_layers))
        self.capture = Capture(model, hidden, s.attention_layers, s.attention_form)
        self.head = HeadTap(model, self.signals)
        self.device = next(model.parameters()).device
        self.ids_dtype = id_dtype(manifest.teacher.vocab_size)
        self.ranks: np.ndarray | None = None
        self.hidden_codecs: dict[int, HiddenCodec] = {}
        self.factor_codecs: dict[tuple[int, str], FactorCodec] = {}  # projected attention: (layer, part) -> code
        self.signal_row: np.ndarray | None = None  # None: every sequence carries hidden states and attention

    def use(self, codecs: Codecs, signal_row: np.ndarray | None) -> None:
        """The store's codes and which sequences carry hidden states and attention (never recomputed: a resumed
        run and every rank encode with what it holds)."""
        if self.m.ranked_ids:
            self.ranks = ranks_of(codecs.id_table)
        self.hidden_codecs = {layer: c.to(self.device) for layer, c in codecs.hidden.items()}
        self.factor_codecs = {key: c.to(self.device) for key, c in codecs.factors.items()}
        self.signal_row = signal_row

    def batches(self, n: int) -> list[range]:
        return [range(b0, min(b0 + self.batch_size, n)) for b0 in range(0, n, self.batch_size)]

    def _forward(self, tokens: np.ndarray, lengths: np.ndarray, sequence_ids: range, rows: range,
                 edits=None) -> Captured:
        ids = torch.from_numpy(np.asarray(tokens[rows.start:rows.stop])).long().to(self.device)
        mask = None
        if self.m.data.packing == "padded":
            lens = torch.from_numpy(lengths[rows.start:rows.stop]).to(self.device)
            mask = (torch.arange(ids.shape[1], device=self.device)[None, :] < lens[:, None]).long()
        self.head.sequence_ids = list(sequence_ids[rows.start:rows.stop])
        if edits is not None:
            with Capture(self.model, edits=edits):
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            return Captured(rows, self._logits())
        self.capture.clear()
        self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return Captured(rows, self._logits(), dict(self.capture.hidden), dict(self.capture.attention))

    def _logits(self) -> dict[str, torch.Tensor]:
        return {k: v for k in LOGIT_FIELDS if (v := getattr(self.signals, k)) is not None}

    @torch.inference_mode()
    def calibration_batches(self, tokens: np.ndarray, lengths: np.ndarray, sequence_ids: range,
                            count: int) -> list[Captured]:
        """The first batches of a unit covering at least `count` sequences, held (on the CPU) to be encoded
        later as that unit's first batches."""
        out = []
        with self.head, self.capture:
            for rows in self.batches(len(tokens)):
                if rows.start >= count:
                    break
                out.append(self._forward(tokens, lengths, sequence_ids, rows).to("cpu"))
        return out

    @torch.inference_mode()
    def unit(self, tokens: np.ndarray, lengths: np.ndarray, sequence_ids: range, bar,
             held: list[Captured] = ()) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        s = self.m.signals
        unit = sequence_ids.start // self.m.layout.sequences_per_unit
        # the unit's sequences (positions within it) that carry hidden states and attention
        chosen = np.arange(len(tokens)) if self.signal_row is None else \
            np.flatnonzero(self.signal_row[sequence_ids.start:sequence_ids.stop] >= 0)
        # and, position-subsampled, the positions of each sequence that do (storage.schema.draw_positions)
        positions = draw_positions(self.m, unit, lengths) if self.m.position_subsampled else None
        plan = None
        if s.interchange_layers:
            plan = plan_unit(s.seed, unit, lengths, s.interchange_layers, s.interchange_rate)
        states: dict[int, torch.Tensor] = {}
        batches = self.batches(len(tokens))
        with self.head:
            with self.capture:
                for i, rows in enumerate(batches):
                    cap = held[i].to(self.device) if i < len(held) else self._forward(tokens, lengths, sequence_ids,
                                                                                      rows)
                    for name, arr in self._encode(cap, chosen, positions).items():
                        parts.setdefault(name, []).append(arr)
                    if plan is not None:
                        states.update(source_states(plan, rows, cap.hidden))
                    bar.update(int(lengths[rows.start:rows.stop].sum()))
            if plan is not None:  # the counterfactual runs, once every source state is known; nothing else captured
                for rows in batches:
                    cap = self._forward(tokens, lengths, sequence_ids, rows, interchange_edits(plan, rows, states))
                    for name, arr in zip(("interchange/topk_ids", "interchange/topk_values"), self._topk_arrays(cap)):
                        parts.setdefault(name, []).append(arr)
        out = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        if plan is not None:
            out |= {"interchange/source": plan["source"] + sequence_ids.start, "interchange/layer": plan["layer"],
                    "interchange/span": plan["span"]}
        return out

    def _encode(self, cap: Captured, chosen: np.ndarray, positions: np.ndarray | None) -> dict[str, np.ndarray]:
        s, sig = self.m.signals, cap.logits
        lse = sig["logsumexp"].cpu().numpy()
        out = {}
        if self.m.compact_topk:
            out = dict(zip(("logits/topk_ids", "logits/topk_values"), encode_topk(
                sig["topk_ids"].cpu().numpy(), sig["topk_values"].cpu().numpy(), self.ranks, self.ids_dtype)))
            out["logits/logtail"] = sig["logtail"].cpu().numpy().astype(np.float16)
        elif s.top_k:
            out["logits/topk_ids"], out["logits/topk_values"] = self._topk_arrays(cap)
            if s.logtail:  # a cache begun by an older kdpipe is resumed in its own format
                out["logits/logtail"] = sig["logtail"].cpu().numpy()
        if self.m.compact_normalizers:
            out["logits/logsumexp"] = lse[..., :1]
            if len(s.temperatures) > 1:  # log sum p^(1/T) = logsumexp_T - logsumexp_1 / T, small: float16 holds it
                temps = np.asarray(s.temperatures[1:], np.float32)
                out["logits/lognorm"] = (lse[..., 1:] - lse[..., :1] / temps).astype(np.float16)
        else:
            out["logits/logsumexp"] = lse
        if s.sample_count:
            ids, counts = sig["sampled_ids"].cpu().numpy(), sig["sampled_counts"].cpu().numpy()
            logp = quantize_logprobs(sig["sampled_logprobs"].cpu().numpy()) if s.sampled_logprobs else None
            if self.m.compact_sampled:
                ids, counts, logp = encode_sampled(ids, counts, logp, self.ranks, self.ids_dtype, s.sample_count)
            else:
                ids, counts = ids.astype(self.ids_dtype), counts.astype(np.uint16)
            out["sampled/ids"], out["sampled/counts"] = ids, counts
            if logp is not None:
                out["sampled/logprobs"] = logp
        # hidden states and attention of the batch's rows that carry them (all, unless subsampled)
        where = np.flatnonzero(np.isin(np.asarray(cap.rows), chosen))
        index = torch.from_numpy(where).to(self.device)
        rows = (lambda x: x) if len(where) == len(cap.rows) else (lambda x: x[index])  # noqa: E731
        pick = lambda x, time_dim: rows(x)  # noqa: E731
        if positions is not None:  # and of those rows, the drawn positions only: [b, T, ...] -> [b, P, ...]
            pos = positions[np.asarray(cap.rows)[where]]
            out["tokens/signal_positions"] = pos.astype(positions_dtype(self.m))
            at = torch.from_numpy(pos).to(self.device)
            pick = lambda x, time_dim: gather_time(rows(x), at, time_dim)  # noqa: E731
        for layer in s.hidden_layers:
            out |= self._hidden(layer, pick(cap.hidden[layer], 1))
        for layer in s.attention_layers:
            captured = cap.attention[layer]
            if s.attention_form == "factors":
                for part, x in zip("qkv", captured):
                    name = attention_name(layer, part)
                    if s.attention_rank:
                        q, step = self.factor_codecs[layer, part].encode(pick(x, 2))
                        out[name], out[f"{name}_step"] = q.cpu().numpy(), step.cpu().numpy()
                    elif s.attention_codec == "int8":
                        q, step = quantize(pick(x, 2).float())
                        out[name], out[f"{name}_step"] = q.cpu().numpy(), step.cpu().numpy()
                    else:
                        out[name] = pick(x, 2).to(torch.float16).cpu().numpy()
            elif s.attention_dtype == "uint8":
                out[attention_name(layer)] = torch.round(pick(captured, 2) * 255).to(torch.uint8).cpu().numpy()
            else:
                out[attention_name(layer)] = pick(captured, 2).to(torch.float16).cpu().numpy()
        return out

    def _topk_arrays(self, cap: Captured) -> tuple[np.ndarray, np.ndarray]:
        """A forward's top-k ids and float16 log-probabilities (T=1), as a float16 cache stores them."""
        sig = cap.logits
        return sig["topk_ids"].cpu().numpy().astype(self.ids_dtype), sig["topk_values"].to(torch.float16).cpu().numpy()

    def _hidden(self, layer: int, x: torch.Tensor) -> dict[str, np.ndarray]:
        s, name = self.m.signals, hidden_name(layer)
        if s.hidden_codec == "int8":
            q, step = self.hidden_codecs[layer].encode(x)
            return {name: q.cpu().numpy(), f"{name}_step": step.cpu().numpy()}
        if s.hidden_dtype == "bfloat16":
            bits = x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
        else:
            half = x.to(torch.float16)
            if not torch.isfinite(half).all() and torch.isfinite(x).all():
                raise UserError(f"hidden states of layer {layer} exceed the float16 range: rerun with "
                                f"--hidden-dtype bfloat16")
            bits = half.cpu().numpy().view(np.uint16)
        if s.hidden_keepbits is not None:
            bits = bitround(bits, s.hidden_dtype, s.hidden_keepbits)
        return {name: bits if s.hidden_dtype == "bfloat16" else bits.view(np.float16)}

    @torch.inference_mode()
    def idle_forward(self, tokens: np.ndarray) -> None:
        """A forward whose results are dropped: under ZeRO-3 on several ranks every forward gathers each
        layer's parameters from all ranks, so a rank out of work must keep step with the others."""
        self.model(input_ids=torch.from_numpy(np.asarray(tokens[:1])).long().to(self.device), use_cache=False)
