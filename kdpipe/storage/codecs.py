"""Codec presets per array, and lossy bit-rounding for hidden states.

Every preset ends in a crc32c checksum so that a damaged chunk fails loudly on read and
`kdpipe verify` can name the sequences it covers.
"""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

PRESETS = {
    # token ids and top-k ids: byte shuffle groups the high bytes, which are mostly equal
    "ids": dict(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle),
    # the compact top-k (storage.topk_codec): rank gaps and 8-bit levels are written once and read by every
    # student run, so zstd's slower level 9 (5-8% smaller than 3 here) is worth it
    "ranks": dict(cname="zstd", clevel=9, shuffle=BloscShuffle.shuffle),
    "levels": dict(cname="zstd", clevel=9, shuffle=BloscShuffle.noshuffle),
    # ... and its normalizers (T=1 logsumexp, float16 log-norms and tails): byte shuffle at level 9 stores them
    # smaller than the float preset (SmolLM2 over Paradise Lost: figures in bench/RESULTS.md, "Compact top-k")
    "normalizers": dict(cname="zstd", clevel=9, shuffle=BloscShuffle.shuffle),
    # int8 hidden states and attention factors (storage.signal_codec): two's complement small values share
    # their high bits, which bit shuffle lines up
    "int8": dict(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),
    # float16 logits, hidden states, attention: bit shuffle exposes the slowly varying exponent bits
    "floats": dict(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),
    # dense attention is the bulkiest signal: favour speed over the last few percent
    "attention": dict(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle),
    # files kept whole (the tokenizer's): plain zstd. Level 5, not 9: blosc's 9 is zstd's slowest (22), which
    # took 23 s for Gemma 3's 33 MB tokenizer.json (4.40 MB) where 5 takes 0.7 s (5.25 MB), once per cache
    "bytes": dict(cname="zstd", clevel=5, shuffle=BloscShuffle.noshuffle),
    # ledger flags and small arrays: checksum only
    "raw": None,
}


def compressors(preset: str) -> list:
    """The zarr v3 bytes-to-bytes codec chain of a preset."""
    blosc = PRESETS[preset]
    chain = [] if blosc is None else [BloscCodec(**blosc)]
    return chain + [Crc32cCodec()]


_MANTISSA_BITS = {"float16": 10, "bfloat16": 7}


def bitround(bits: np.ndarray, dtype: str, keepbits: int) -> np.ndarray:
    """Round the mantissa of float16/bfloat16 values (given as their uint16 bit patterns) to `keepbits`
    bits, round-half-to-even; the zeroed low bits make bit-shuffled blocks far more compressible."""
    drop = _MANTISSA_BITS[dtype] - keepbits
    if drop <= 0:
        return bits
    x = bits.astype(np.uint32)
    half = (1 << (drop - 1)) - 1
    x += half + ((x >> drop) & 1)
    x &= ~np.uint32((1 << drop) - 1) & 0xFFFF
    # rounding can carry into the exponent, which is exactly the correct rounding; never into the sign bit
    # except for values already at the largest exponent, which float16 hidden states do not reach
    return x.astype(np.uint16)


# The T=1 log-probabilities of sampled ids weight draws for another temperature: log w = (1/T - 1/T_s) log p.
# In steps of 1/16 nat the weight is off by at most exp(|1/T - 1/T_s| / 32), 1.6% for T=2 from T=1 draws,
# and 8 bits reach -255/16 = -15.9 nats: a draw of p < 1.2e-7 (one in 8 million per draw) reads as that floor.
LOGPROB_STEP = 1 / 16
LOGPROB_FLOOR = 255 * LOGPROB_STEP


def quantize_logprobs(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities (<= 0) as uint8 multiples of -LOGPROB_STEP."""
    return np.clip(np.rint(-logp / LOGPROB_STEP), 0, 255).astype(np.uint8)


def dequantize_logprobs(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.float32(-LOGPROB_STEP)
