"""Before anything is written, the teacher's own forward once, against what extraction will store.

The sliced head (logits.HeadTap) re-implements the step from the last hidden state to the logits, and
attention stored as Q/K/V factors is rebuilt later with a mask of kdpipe's making. Both are only right if
they reproduce the model. So on one sequence of the corpus: the top-k log-probabilities and logsumexp the
sliced head produces must equal those of the model's own `forward().logits` (after every transform the
model applies: scaling, soft-capping), or the teacher is refused by name; and the mask each captured
block applies is read off the model itself and recorded as a sliding window (or plain causal), or, for
the factors form, refused if it is another pattern.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch

from kdpipe.capture import Capture
from kdpipe.errors import UserError
from kdpipe.stage1_extract.logits import HeadTap, LogitSignals, LogitSpec
from kdpipe.storage.attention import window_of

POSITIONS = 16  # positions of the probe sequence compared with the model's own logits


@dataclasses.dataclass
class ProbeResult:
    windows: list[int]  # per captured attention layer: 0 = plain causal, w = a sliding window of w keys
    softcap: float | None  # the attention soft-capping the model applies (Gemma 2), None if none
    scaling: float | None  # the softmax scale of Q K^T the attention calls use (None: no attention captured)
    logsumexp_error: float  # largest |difference| from the model's own logsumexp, nats


@torch.inference_mode()
def probe(model, spec: LogitSpec, tokens: np.ndarray, length: int, attention_layers: list[int], form: str | None,
          dtype: str) -> ProbeResult:
    device = next(model.parameters()).device
    ids = torch.from_numpy(tokens[None, :length]).long().to(device)
    signals = LogitSignals(dataclasses.replace(spec, sample_count=0, top_k=min(max(spec.top_k, 1), 8)))
    head = HeadTap(model, signals)
    head.sequence_ids = [0]
    with head, Capture(model, [], attention_layers, "factors") as cap:
        model(input_ids=ids, use_cache=False)
    keep = min(POSITIONS, length)
    extra = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=ids, use_cache=False, **extra).logits[0, -keep:].float()

    lse_model = torch.logsumexp(logits, -1)
    lse_ours = signals.logsumexp[0, -keep:, 0]
    top_model = logits.topk(signals.spec.top_k, -1).values - lse_model[:, None]
    top_ours = signals.topk_values[0, -keep:]
    error = float(max((lse_ours - lse_model).abs().max(), (top_ours - top_model).abs().max()))
    tolerance = 1e-3 if dtype == "float32" else 5e-2  # half-precision logits are rounded in the model itself
    if not error <= tolerance * max(1.0, float(lse_model.abs().max())):
        name = type(model).__name__
        raise UserError(f"{name}'s output head is not reproduced by kdpipe's sliced head (log-probabilities off by "
                        f"{error:.3g} nats against the model's own forward): {name} transforms its logits in a way "
                        f"kdpipe does not know, so its signals would be stored wrong; it is not supported yet")

    windows = []
    for layer in attention_layers:
        window = window_of(cap.masks.get(layer))
        if window is None and form == "factors":
            raise UserError(f"block {layer} of {type(model).__name__} attends with a mask that is neither causal nor "
                            f"a sliding window: factors cannot be rebuilt exactly, use --attention-form probs")
        windows.append(window or 0)
    caps = {cap.softcaps.get(layer) for layer in attention_layers}
    if len(caps) > 1 and form == "factors":
        raise UserError(f"the blocks of {type(model).__name__} soft-cap attention differently: use "
                        f"--attention-form probs")
    scales = {round(cap.scalings[layer], 12) for layer in attention_layers}
    if len(scales) > 1 and form == "factors":
        raise UserError(f"the blocks of {type(model).__name__} scale attention differently: use --attention-form probs")
    return ProbeResult(windows, caps.pop() if caps else None, scales.pop() if scales else None, error)
