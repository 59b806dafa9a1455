"""Which teacher layer each student layer learns from; shared by every layer-wise method.

Layers are numbered as in the cache: 0 = embeddings, i = output of block i (Hugging Face `hidden_states`).
"""

from __future__ import annotations

from kdpipe.errors import UserError


def map_layers(strategy: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for student layers 1..S.

    uniform: student i <- teacher round(i * L / S) (TinyBERT); skip: student i <- teacher i * (L // S)
    (PKD-skip); last: the top S teacher layers (PKD-last); explicit: "1:2,2:4,3:6".
    """
    s, t = student_layers, teacher_layers
    if strategy == "uniform":
        return [(i, round(i * t / s)) for i in range(1, s + 1)]
    if strategy == "skip":
        return [(i, i * max(1, t // s)) for i in range(1, s + 1)]
    if strategy == "last":
        return [(i, t - s + i) for i in range(1, s + 1) if t - s + i >= 1]
    try:
        pairs = [tuple(int(x) for x in pair.split(":")) for pair in strategy.split(",") if pair]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise UserError(f"bad layer map {strategy!r}: use uniform, skip, last, or student:teacher pairs like 1:2,2:4")
    for sl, tl in pairs:
        if not (0 <= sl <= s and 0 <= tl <= t):
            raise UserError(f"layer map pair {sl}:{tl} is out of range (student 0..{s}, teacher 0..{t})")
    return pairs
