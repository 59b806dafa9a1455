"""Running the teacher over one work unit, batch by batch, with capture, into numpy arrays."""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.capture import Capture
from kdpipe.errors import UserError
from kdpipe.stage1_extract.logits import HeadTap, LogitSignals, LogitSpec
from kdpipe.storage.codecs import bitround
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.schema import attention_name, hidden_name, id_dtype


class UnitRunner:
    """Runs the teacher over one work unit, batch by batch, and returns its arrays as numpy."""

    def __init__(self, model, manifest: Manifest, spec: LogitSpec, batch_size: int):
        self.model, self.m, self.batch_size = model, manifest, batch_size
        self.signals = LogitSignals(spec)
        s = manifest.signals
        self.capture = Capture(model, s.hidden_layers, s.attention_layers, s.attention_form)
        self.head = HeadTap(model, self.signals)
        self.device = next(model.parameters()).device
        self.ids_dtype = id_dtype(manifest.teacher.vocab_size)

    @torch.inference_mode()
    def unit(self, tokens: np.ndarray, lengths: np.ndarray, sequence_ids: range, bar) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        bs = self.batch_size
        with self.capture, self.head:
            for b0 in range(0, len(tokens), bs):
                ids = torch.from_numpy(tokens[b0:b0 + bs]).long().to(self.device)
                mask = None
                if self.m.data.packing == "padded":
                    lens = torch.from_numpy(lengths[b0:b0 + bs]).to(self.device)
                    mask = (torch.arange(ids.shape[1], device=self.device)[None, :] < lens[:, None]).long()
                self.capture.clear()
                self.head.sequence_ids = list(sequence_ids[b0:b0 + bs])
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                for name, arr in self._batch_arrays().items():
                    parts.setdefault(name, []).append(arr)
                bar.update(int(lengths[b0:b0 + bs].sum()))
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def _batch_arrays(self) -> dict[str, np.ndarray]:
        s, sig = self.m.signals, self.signals
        out = {
            "logits/topk_ids": sig.topk_ids.cpu().numpy().astype(self.ids_dtype),
            "logits/topk_values": sig.topk_values.to(torch.float16).cpu().numpy(),
            "logits/logsumexp": sig.logsumexp.cpu().numpy(),
        }
        if s.sample_count:
            out["sampled/ids"] = sig.sampled_ids.cpu().numpy().astype(self.ids_dtype)
            out["sampled/counts"] = sig.sampled_counts.cpu().numpy().astype(np.uint16)
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
