"""Interchange interventions for DIITO (Wu et al. 2022, "Causal Distillation for Language Models"),
fixed at extraction time so that the teacher runs them once and every student replays the same ones.

For each sequence of a work unit (the base) a source sequence of the same unit, a teacher layer and
a span are drawn, seeded by (seed, unit): the same on every rank and after a resume. The teacher
then runs the base with the source's hidden states at that layer copied over a consecutive span of
the base (a fraction `rate` of the shorter length; spans start independently in base and source,
as in the authors' code), and the counterfactual top-k log-probabilities are cached.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def plan_unit(seed: int, unit: int, lengths: np.ndarray, layers: list[int], rate: float) -> dict[str, np.ndarray]:
    """source (index within the unit), layer, span = (base start, source start, length) per sequence."""
    n = len(lengths)
    rng = np.random.default_rng([seed, 1_000_003, unit])
    shift = int(rng.integers(1, n)) if n > 1 else 0  # a rotation: every sequence is a source exactly once
    source = (np.arange(n) + shift) % n
    layer = rng.choice(np.asarray(layers, dtype=np.int16), size=n)
    span = np.zeros((n, 3), dtype=np.int32)
    for i in range(n):
        base_len, source_len = int(lengths[i]), int(lengths[source[i]])
        count = max(1, int(min(base_len, source_len) * rate))
        span[i] = (rng.integers(0, base_len - count + 1), rng.integers(0, source_len - count + 1), count)
    return {"source": source.astype(np.int32), "layer": layer, "span": span}


def source_states(plan: dict[str, np.ndarray], rows: range, hidden: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """From a forward over the unit's sequences `rows`, the span states each base will receive: the
    source's states at the base's layer (base index -> [count, H])."""
    base_of = np.argsort(plan["source"])  # the base that reads each source
    out = {}
    for r, i in enumerate(rows):
        b = int(base_of[i])
        start, count = int(plan["span"][b, 1]), int(plan["span"][b, 2])
        out[b] = hidden[int(plan["layer"][b])][r, start:start + count].clone()
    return out


def interchange_edits(plan: dict[str, np.ndarray], rows: range,
                      states: dict[int, torch.Tensor]) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """Edits (see capture.Capture) that copy each base's source states over its span, for a forward
    over the bases `rows`."""
    edits = {}
    for layer in sorted({int(plan["layer"][i]) for i in rows}):
        chosen = [(r, i) for r, i in enumerate(rows) if int(plan["layer"][i]) == layer]

        def edit(h: torch.Tensor, chosen=chosen) -> torch.Tensor:
            h = h.clone()
            for r, i in chosen:
                start, count = int(plan["span"][i, 0]), int(plan["span"][i, 2])
                h[r, start:start + count] = states[i].to(h.dtype)
            return h
        edits[layer] = edit
    return edits
