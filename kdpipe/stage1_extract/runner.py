"""Running the teacher over one work unit, batch by batch, with capture, into numpy arrays."""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.capture import Capture
from kdpipe.errors import UserError
from kdpipe.stage1_extract.interchange import interchange_edits, plan_unit, source_states
from kdpipe.stage1_extract.logits import HeadTap, LogitSignals, LogitSpec
from kdpipe.storage.codecs import bitround, quantize_logprobs
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.schema import attention_name, hidden_name, id_dtype
from kdpipe.storage.topk_codec import encode as encode_topk, ranks_of


class UnitRunner:
    """Runs the teacher over one work unit, batch by batch, and returns its arrays as numpy."""

    def __init__(self, model, manifest: Manifest, spec: LogitSpec, batch_size: int, id_table: np.ndarray | None = None):
        self.model, self.m, self.batch_size = model, manifest, batch_size
        self.ranks = ranks_of(id_table) if manifest.compact_topk else None  # the store's table, never recomputed
        self.signals = LogitSignals(spec)
        s = manifest.signals
        # interchange layers are captured too: their states are the sources of DIITO's interventions
        hidden = sorted(set(s.hidden_layers) | set(s.interchange_layers))
        self.capture = Capture(model, hidden, s.attention_layers, s.attention_form)
        self.head = HeadTap(model, self.signals)
        self.device = next(model.parameters()).device
        self.ids_dtype = id_dtype(manifest.teacher.vocab_size)

    def _forward(self, tokens: np.ndarray, lengths: np.ndarray, sequence_ids: range, rows: range) -> None:
        ids = torch.from_numpy(tokens[rows.start:rows.stop]).long().to(self.device)
        mask = None
        if self.m.data.packing == "padded":
            lens = torch.from_numpy(lengths[rows.start:rows.stop]).to(self.device)
            mask = (torch.arange(ids.shape[1], device=self.device)[None, :] < lens[:, None]).long()
        self.capture.clear()
        self.head.sequence_ids = list(sequence_ids[rows.start:rows.stop])
        self.model(input_ids=ids, attention_mask=mask, use_cache=False)

    @torch.inference_mode()
    def unit(self, tokens: np.ndarray, lengths: np.ndarray, sequence_ids: range, bar) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        s = self.m.signals
        batches = [range(b0, min(b0 + self.batch_size, len(tokens))) for b0 in range(0, len(tokens), self.batch_size)]
        plan = None
        if s.interchange_layers:
            unit = sequence_ids.start // self.m.layout.sequences_per_unit
            plan = plan_unit(s.seed, unit, lengths, s.interchange_layers, s.interchange_rate)
        states: dict[int, torch.Tensor] = {}
        with self.head:
            with self.capture:
                for rows in batches:
                    self._forward(tokens, lengths, sequence_ids, rows)
                    for name, arr in self._batch_arrays().items():
                        parts.setdefault(name, []).append(arr)
                    if plan is not None:
                        states.update(source_states(plan, rows, self.capture.hidden))
                    bar.update(int(lengths[rows.start:rows.stop].sum()))
            if plan is not None:  # the counterfactual runs, once every source state is known; nothing else captured
                for rows in batches:
                    with Capture(self.model, edits=interchange_edits(plan, rows, states)):
                        self._forward(tokens, lengths, sequence_ids, rows)
                    for name, arr in zip(("interchange/topk_ids", "interchange/topk_values"), self._topk_arrays()):
                        parts.setdefault(name, []).append(arr)
        out = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        if plan is not None:
            out |= {"interchange/source": plan["source"] + sequence_ids.start, "interchange/layer": plan["layer"],
                    "interchange/span": plan["span"]}
        return out

    def _batch_arrays(self) -> dict[str, np.ndarray]:
        s, sig = self.m.signals, self.signals
        lse = sig.logsumexp.cpu().numpy()
        if self.m.compact_topk:
            out = dict(zip(("logits/topk_ids", "logits/topk_values"), encode_topk(
                sig.topk_ids.cpu().numpy(), sig.topk_values.cpu().numpy(), self.ranks, self.ids_dtype)))
            out["logits/logsumexp"] = lse[..., :1]
            if len(s.temperatures) > 1:  # log sum p^(1/T) = logsumexp_T - logsumexp_1 / T, small: float16 holds it
                temps = np.asarray(s.temperatures[1:], np.float32)
                out["logits/lognorm"] = (lse[..., 1:] - lse[..., :1] / temps).astype(np.float16)
            out["logits/logtail"] = sig.logtail.cpu().numpy().astype(np.float16)
        else:
            out = {"logits/logsumexp": lse}
            if s.top_k:
                out["logits/topk_ids"], out["logits/topk_values"] = self._topk_arrays()
            if s.logtail and s.top_k:  # a cache begun by an older kdpipe is resumed in its own format
                out["logits/logtail"] = sig.logtail.cpu().numpy()
        if s.sample_count:
            out["sampled/ids"] = sig.sampled_ids.cpu().numpy().astype(self.ids_dtype)
            out["sampled/counts"] = sig.sampled_counts.cpu().numpy().astype(np.uint16)
            if s.sampled_logprobs:
                out["sampled/logprobs"] = quantize_logprobs(sig.sampled_logprobs.cpu().numpy())
        for layer in s.hidden_layers:
            out[hidden_name(layer)] = self._hidden(layer, self.capture.hidden[layer])
        for layer in s.attention_layers:
            captured = self.capture.attention[layer]
            if s.attention_form == "factors":
                for part, x in zip("qkv", captured):
                    out[attention_name(layer, part)] = x.to(torch.float16).cpu().numpy()
            elif s.attention_dtype == "uint8":
                out[attention_name(layer)] = torch.round(captured * 255).to(torch.uint8).cpu().numpy()
            else:
                out[attention_name(layer)] = captured.to(torch.float16).cpu().numpy()
        return out

    def _topk_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The last forward's top-k ids and float16 log-probabilities (T=1), as stored."""
        sig = self.signals
        return sig.topk_ids.cpu().numpy().astype(self.ids_dtype), sig.topk_values.to(torch.float16).cpu().numpy()

    def _hidden(self, layer: int, x: torch.Tensor) -> np.ndarray:
        s = self.m.signals
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
        return bits if s.hidden_dtype == "bfloat16" else bits.view(np.float16)

    @torch.inference_mode()
    def idle_forward(self, tokens: np.ndarray) -> None:
        """A forward whose results are dropped: under ZeRO-3 on several ranks every forward gathers each
        layer's parameters from all ranks, so a rank out of work must keep step with the others."""
        self.model(input_ids=torch.from_numpy(tokens[:1]).long().to(self.device), use_cache=False)
