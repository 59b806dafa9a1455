"""Which teacher layer each student layer learns from; shared by every layer-wise method.

Layers are numbered as in the cache: 0 = embeddings, i = output of block i (Hugging Face `hidden_states`).
"""

from __future__ import annotations

import math

from kdpipe.errors import UserError


def check_layer_map(strategy: str) -> None:
    """The syntax of a layer map, before the layer counts are known."""
    if strategy in ("uniform", "skip", "last"):
        return
    try:
        pairs = [tuple(int(x) for x in pair.split(":")) for pair in strategy.replace(";", ",").split(",") if pair]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise UserError(f"bad layer map {strategy!r}: use uniform, skip, last, or student:teacher pairs like 1:2,2:4")


def map_layers(strategy: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for student layers 1..S.

    uniform: student i <- teacher i * L / S rounded half up, at least 1 (TinyBERT); skip: student i <- teacher i * (L // S)
    (PKD-skip); last: the top S teacher layers (PKD-last); explicit: "1:2,2:4,3:6".
    """
    s, t = student_layers, teacher_layers
    if strategy == "uniform":
        # half up, not Python's half-to-even; and never the embeddings (a student deeper than its teacher)
        return [(i, max(1, math.floor(i * t / s + 0.5))) for i in range(1, s + 1)]
    if strategy == "skip":
        return [(i, i * max(1, t // s)) for i in range(1, s + 1)]
    if strategy == "last":
        return [(i, t - s + i) for i in range(1, s + 1) if t - s + i >= 1]
    check_layer_map(strategy)
    pairs = [tuple(int(x) for x in pair.split(":")) for pair in strategy.replace(";", ",").split(",") if pair]
    for sl, tl in pairs:
        if not (0 <= sl <= s and 0 <= tl <= t):
            raise UserError(f"layer map pair {sl}:{tl} is out of range (student 0..{s}, teacher 0..{t})")
    return pairs
