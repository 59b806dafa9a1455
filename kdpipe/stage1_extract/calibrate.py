"""What the compressed encodings are fitted to: the teacher's outputs on its first sequences.

Calibration runs the first batches of unit 0 (at least CALIBRATION_SEQUENCES sequences, and enough tokens to
fit the hidden-state projections) once; those outputs are then written as unit 0's first batches, so the
calibration costs no forward of its own. Every rank runs the same batches (ZeRO-3 keeps ranks' forwards in
step), rank 0 fits and stores the codes, and every rank (and every resumed run) encodes with the stored ones.

- The rank table of the compact top-k and draws (storage.topk_codec, storage.sampled_codec): tokens by how often
  they are in the teacher's top-k on these batches (in its draws, for a cache without a top-k), then by corpus
  frequency (the first ~1M tokens), then by id. Counting over 8 sequences gets within 4% of the bytes of a
  table counted over the whole cache (bench/RESULTS.md, "Compact top-k").
- Each int8 hidden layer's channel center and scale, and its projection (storage.signal_codec), over the valid
  tokens of these batches; and each encoding's error on them, recorded in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kdpipe.stage1_extract.runner import Captured
from kdpipe.storage.codes import Codecs
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.signal_codec import HiddenCodec, factor_error
from kdpipe.storage.topk_codec import rank_table

CALIBRATION_SEQUENCES = 8
TOKENS_PER_DIMENSION = 4  # an int8 hidden layer's projection is fitted on at least 4 tokens per dimension
CORPUS_SEQUENCES = 4096  # corpus frequencies from the first ~1M tokens (at 256 a row) break the ties


def calibration_sequences(m: Manifest) -> int:
    """How many of unit 0's sequences calibrate (0: nothing to calibrate)."""
    s = m.signals
    if not (m.ranked_ids or s.hidden_codec == "int8" or s.attention_codec == "int8"):
        return 0
    count = CALIBRATION_SEQUENCES
    if s.hidden_codec == "int8" and s.hidden_layers:
        count = max(count, math.ceil(TOKENS_PER_DIMENSION * m.teacher.hidden_size / m.data.seq_len))
    return min(count, m.layout.sequences_per_unit, m.data.num_sequences)


@dataclass
class Calibration:
    codecs: Codecs
    hidden_error: list[float] = field(default_factory=list)  # per hidden layer, signals.hidden_error
    attention_error: list[float] = field(default_factory=list)


def calibrate(m: Manifest, held: list[Captured], tokens, lengths: np.ndarray, device="cpu") -> Calibration:
    """The codes, fitted on the held batches (on `device`, the teacher's: a 9216-wide projection is fitted in
    float64 there), and each encoding's error on them."""
    vocab, s = m.teacher.vocab_size, m.signals
    valid = [torch.arange(m.data.seq_len)[None, :] < torch.from_numpy(lengths[c.rows.start:c.rows.stop])[:, None]
             for c in held]
    out = Calibration(Codecs())
    if m.ranked_ids:
        topk_counts = np.zeros(vocab, np.int64)
        for cap, mask in zip(held, valid):
            if s.top_k:
                ids = cap.logits["topk_ids"][mask]
            else:  # the distinct ids drawn
                ids = cap.logits["sampled_ids"][mask][cap.logits["sampled_counts"][mask] > 0]
            topk_counts += np.bincount(ids.numpy().ravel(), minlength=vocab)[:vocab]
        token_counts = np.zeros(vocab, np.int64)
        for b0 in range(0, min(CORPUS_SEQUENCES, len(lengths)), 256):
            rows = np.asarray(tokens[b0:b0 + 256])
            keep = np.arange(rows.shape[1])[None, :] < lengths[b0:b0 + 256][:, None]
            token_counts += np.bincount(np.clip(rows[keep], 0, vocab - 1), minlength=vocab)[:vocab]
        out.codecs.id_table = rank_table(topk_counts, token_counts)
    if s.hidden_codec == "int8":
        for layer in s.hidden_layers:
            states = torch.cat([cap.hidden[layer][mask] for cap, mask in zip(held, valid)]).to(device)
            code, _ = HiddenCodec.fit(states, s.hidden_rank)
            out.codecs.hidden[layer] = code.to("cpu")
            out.hidden_error.append(round(code.relative_error(states), 6))
    if s.attention_codec == "int8":
        for layer in s.attention_layers:
            errors = []
            for i in range(3):  # q, k, v [B, heads, T, d] -> the valid tokens' vectors [n, heads, d]
                x = torch.cat([cap.attention[layer][i].transpose(1, 2)[mask] for cap, mask in zip(held, valid)])
                errors.append(factor_error(x))
            out.attention_error.append(round(max(errors), 6))  # the worst of q, k, v
    return out
