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
- Each projected attention layer's Q/K/V codes (storage.signal_codec.FactorCodec): Q and K fitted to keep the
  scores q.k (each in the other's second moments), V to keep itself; the recorded error is the worst of the
  scores' (up to SCORE_TOKENS tokens' pairs a head) and V's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kdpipe.stage1_extract.runner import Captured
from kdpipe.storage.codes import Codecs
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.signal_codec import FactorCodec, HiddenCodec, factor_error, score_metrics
from kdpipe.storage.topk_codec import rank_table

CALIBRATION_SEQUENCES = 8
TOKENS_PER_DIMENSION = 4  # an int8 hidden layer's projection is fitted on at least 4 tokens per dimension
SCORE_TOKENS = 512  # the scores' error is measured over this many calibration tokens' pairs, per head
CORPUS_SEQUENCES = 4096  # corpus frequencies from the first ~1M tokens (at 256 a row) break the ties


def calibration_sequences(m: Manifest) -> int:
    """How many of unit 0's sequences calibrate (0: nothing to calibrate)."""
    s = m.signals
    if not (m.ranked_ids or s.hidden_codec == "int8" or s.attention_codec == "int8"):
        return 0
    count = CALIBRATION_SEQUENCES
    if s.hidden_codec == "int8" and s.hidden_layers:
        count = max(count, math.ceil(TOKENS_PER_DIMENSION * m.teacher.hidden_size / m.data.seq_len))
    if s.attention_rank:
        count = max(count, math.ceil(TOKENS_PER_DIMENSION * m.teacher.head_dim / m.data.seq_len))
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
            # q, k, v [B, heads, T, d] -> the valid tokens' vectors [n, heads, d]
            q, k, v = (torch.cat([cap.attention[layer][i].transpose(1, 2)[mask] for cap, mask in zip(held, valid)])
                       .to(device) for i in range(3))
            if s.attention_rank:
                metric_q, metric_k = score_metrics(q, k)
                codes = {"q": FactorCodec.fit(q, s.attention_rank, metric_q),
                         "k": FactorCodec.fit(k, s.attention_rank, metric_k),
                         "v": FactorCodec.fit(v, s.attention_rank)}
                out.codecs.factors |= {(layer, part): c.to("cpu") for part, c in codes.items()}
                error = max(score_error(codes["q"], codes["k"], q, k), codes["v"].relative_error(_heads_first(v)))
            else:
                error = max(factor_error(x) for x in (q, k, v))
            out.attention_error.append(round(error, 6))  # the worst of q, k, v (projected: of the scores, v)
    return out


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """Vectors [n, heads, d] as one batch [1, heads, n, d]."""
    return x.transpose(0, 1)[None]


def score_error(code_q: FactorCodec, code_k: FactorCodec, q: torch.Tensor, k: torch.Tensor) -> float:
    """||S' - S||^2 / ||S||^2 of the scores S = q k^T among the first SCORE_TOKENS vectors, every query head
    against the key head it reads, S' from the decoded q and k."""
    q, k = _heads_first(q[:SCORE_TOKENS]), _heads_first(k[:SCORE_TOKENS])
    group = q.shape[1] // k.shape[1]
    q2, k2 = code_q.decode(*code_q.encode(q)), code_k.decode(*code_k.encode(k))
    exact = q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2)
    coded = q2 @ k2.repeat_interleave(group, 1).transpose(-1, -2)
    return float((coded - exact).pow(2).sum() / exact.pow(2).sum().clamp_min(1e-30))
