"""The rank table of the compact top-k (storage.topk_codec), from one calibration batch of the teacher.

Ids are stored as ranks in a table ordered by how often each token is among the teacher's top-k. Counting
that over the first 8 sequences costs one batch's forward and gets within 4% of the bytes of a table counted
over the whole cache (bench/RESULTS.md, "Compact top-k"); corpus frequency orders the tokens the batch never
ranked. Every rank runs the same forward (ZeRO-3 needs them in step) but only rank 0's table is stored, and
every rank encodes with the stored one, as does a resumed run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kdpipe.stage1_extract.logits import HeadTap, LogitSignals, LogitSpec
from kdpipe.storage.topk_codec import rank_table

CALIBRATION_SEQUENCES = 8
CORPUS_SEQUENCES = 4096  # corpus frequencies from the first ~1M tokens (at 256 a row) break the ties


@torch.inference_mode()
def calibrate_id_table(model, spec: LogitSpec, tokens, lengths: np.ndarray, padded: bool,
                       batch_size: int) -> np.ndarray:
    vocab = spec.vocab_size
    device = next(model.parameters()).device
    signals = LogitSignals(dataclasses.replace(spec, sample_count=0))
    head = HeadTap(model, signals)
    topk_counts = np.zeros(vocab, np.int64)
    n = min(CALIBRATION_SEQUENCES, len(lengths))
    with head:
        for b0 in range(0, n, batch_size):
            b1 = min(n, b0 + batch_size)
            ids = torch.from_numpy(np.asarray(tokens[b0:b1])).long().to(device)
            valid = torch.arange(ids.shape[1], device=device)[None, :] < torch.from_numpy(lengths[b0:b1]).to(device)[:, None]
            head.sequence_ids = list(range(b0, b1))
            model(input_ids=ids, attention_mask=valid.long() if padded else None, use_cache=False)
            topk_counts += np.bincount(signals.topk_ids[valid].cpu().numpy().ravel(), minlength=vocab)[:vocab]
    token_counts = np.zeros(vocab, np.int64)
    for b0 in range(0, min(CORPUS_SEQUENCES, len(lengths)), 256):
        rows = np.asarray(tokens[b0:b0 + 256])
        valid = np.arange(rows.shape[1])[None, :] < lengths[b0:b0 + 256][:, None]
        token_counts += np.bincount(np.clip(rows[valid], 0, vocab - 1), minlength=vocab)[:vocab]
    return rank_table(topk_counts, token_counts)
