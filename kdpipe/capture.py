"""Capture hidden states and attention from a Hugging Face model, for the teacher (stage 1) and the
student (stage 2) alike: one module below both stages.

Layer numbers follow Hugging Face `hidden_states`: layer 0 is the embedding output (the input of
block 1), layer i the output of block i, and the last layer the final output after the last norm
(which is what `hidden_states[-1]` holds). Attention layer i is block i's self-attention
(`attentions[i - 1]`).

Hidden states come from forward hooks on the chosen blocks only (`output_hidden_states` would keep
every layer). Attention comes from a wrapper registered in transformers' attention-function registry
around the model's own implementation (sdpa, eager, flash...), so the model keeps its fast kernel and
only the chosen layers pay for the extra softmax.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch
from torch import nn

from kdpipe.errors import UserError
from kdpipe.storage.attention import probs_from_scores, attention_scores

_PREFIX = "kdpipe+"


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the outermost ModuleList with one entry per layer."""
    n = text_config(model).num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise UserError(f"cannot find the {n} transformer blocks of {type(model).__name__}: kdpipe supports "
                    f"Hugging Face models that keep their blocks in one ModuleList")


def self_attention(block: nn.Module) -> nn.Module | None:
    """A block's self-attention module: the one transformers hands to its attention function (it has
    `scaling`), not a cross-attention, not the wrapper around it."""
    for module in block.modules():
        if "Attention" in type(module).__name__ and hasattr(module, "scaling") \
                and not getattr(module, "is_cross_attention", False):
            return module
    return None


def parse_layers(spec: str | Sequence[int] | None, num_layers: int, first: int, what: str) -> list[int]:
    """Layer list from `all`, `none`, `uniform:N`, `last:N` or `0,4,8`; valid layers are first..num_layers."""
    if spec is None:
        return []
    if not isinstance(spec, str):
        layers = [int(x) for x in spec]
    else:
        s = spec.strip().lower()
        try:
            if s in ("", "none"):
                layers = []
            elif s == "all":
                layers = list(range(first, num_layers + 1))
            elif s.startswith("uniform:"):
                n = int(s.split(":", 1)[1])
                n = min(n, num_layers)
                layers = sorted({round(num_layers * j / n) for j in range(1, n + 1)}) if n > 0 else []
            elif s.startswith("last:"):
                n = int(s.split(":", 1)[1])
                layers = list(range(max(first, num_layers - n + 1), num_layers + 1))
            else:
                layers = [int(x) for x in s.replace(" ", "").split(",") if x]
        except ValueError:
            raise UserError(f"bad {what} layer list {spec!r}: use all, none, uniform:N, last:N or 0,4,8") from None
    bad = [x for x in layers if not first <= x <= num_layers]
    if bad:
        raise UserError(f"{what} layer {bad[0]} is out of range: this model has {what} layers {first}..{num_layers}")
    return sorted(set(layers))


def _inner_attention(name: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def call(module, query, key, value, attention_mask, **kwargs):
        if name in ALL_ATTENTION_FUNCTIONS:
            fn = ALL_ATTENTION_FUNCTIONS[name]
        else:  # "eager" is each model's own function, defined next to its attention module
            fn = sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, query, key, value, attention_mask, **kwargs)

    return call


def _register(name: str) -> str:
    """Register `kdpipe+<name>`: the model's own attention `name`, with a tap for chosen modules."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    wrapped = _PREFIX + name
    inner = _inner_attention(name)

    def capturing_attention(module, query, key, value, attention_mask, **kwargs):
        tap = getattr(module, "_kdpipe_tap", None)
        if tap is not None:
            tap(module, query, key, value, attention_mask, kwargs)
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(wrapped, capturing_attention)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    AttentionMaskInterface.register(wrapped, mask_fn)
    return wrapped


def _allowed_keys(mask: torch.Tensor | None, module: nn.Module, tq: int, tk: int, device) -> torch.Tensor | None:
    """The boolean allowed-key mask the model used, from whatever form its attention function got."""
    causal = getattr(module, "is_causal", True)
    tri = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)[None, None]
    if mask is None:  # sdpa/flash pass no mask when plain causal (or no) masking is meant
        return tri if causal and tq > 1 else None
    if mask.dim() == 2:  # flash-style key padding mask [B, Tk]
        keep = mask.bool()[:, None, None, :]
        return keep & tri if causal else keep
    mask = mask[..., :tk]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


class Capture:
    """While active, forward passes of `model` record the chosen hidden layers and attention layers.

    `attention_form`: "probs" records post-softmax maps [B, h, T, T] (float32); "factors" records the
    post-RoPE (q, k, v) handed to the attention function ([B, h, T, d], k/v with the model's KV heads).
    `detach=False` keeps the autograd graph (a student being trained).
    `edits` intervene: edits[i](h) replaces hidden layer i (0 .. L-1) before the next block reads it
    (Theseus' module replacement, DIITO's interchange); what is recorded is the edited state.
    """

    def __init__(self, model: nn.Module, hidden_layers: Sequence[int] = (), attention_layers: Sequence[int] = (),
                 attention_form: str | None = None, detach: bool = True,
                 edits: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None):
        self.model, self.detach = model, detach
        self.hidden_layers, self.attention_layers = list(hidden_layers), list(attention_layers)
        self.edits = dict(edits or {})
        self.attention_form = attention_form
        self.hidden: dict[int, torch.Tensor] = {}
        self.attention: dict[int, torch.Tensor | tuple[torch.Tensor, ...]] = {}
        self.scaling: float | None = None
        self._handles: list = []
        self._tapped: list[nn.Module] = []
        self._saved_impl: str | None = None

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.detach else x

    def __enter__(self) -> "Capture":
        blocks = find_blocks(self.model)
        num_layers = len(blocks)
        if any(not 0 <= layer < num_layers for layer in self.edits):
            raise UserError(f"hidden states can be edited at layers 0..{num_layers - 1} (the inputs of blocks)")
        for layer in sorted(set(self.hidden_layers) | set(self.edits)):
            if layer == 0:
                self._handles.append(blocks[0].register_forward_pre_hook(self._pre_hook(0), with_kwargs=True))
            elif layer == num_layers:
                base = getattr(self.model, "base_model", self.model)
                self._handles.append(base.register_forward_hook(self._out_hook(layer)))
            else:
                self._handles.append(blocks[layer - 1].register_forward_hook(self._out_hook(layer)))
        if self.attention_layers:
            for layer in self.attention_layers:
                module = self_attention(blocks[layer - 1])
                if module is None:
                    raise UserError(f"cannot find the self-attention of block {layer} in {type(self.model).__name__}")
                # a block shared across positions (ALBERT) is tapped per position, through its wrapper
                holder = blocks[layer - 1] if getattr(blocks[layer - 1], "kdpipe_shared", False) else module
                holder._kdpipe_tap = self._attention_tap(layer)
                self._tapped.append(holder)
            impl = text_config(self.model)._attn_implementation or "eager"
            self._saved_impl = impl
            if not impl.startswith(_PREFIX):
                self.model.set_attn_implementation(_register(impl))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._tapped:
            del module._kdpipe_tap
        if self._saved_impl is not None and not self._saved_impl.startswith(_PREFIX):
            self.model.set_attn_implementation(self._saved_impl)
        self._handles, self._tapped, self._saved_impl = [], [], None

    def clear(self) -> None:
        self.hidden.clear()
        self.attention.clear()

    def _pre_hook(self, layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            edit = self.edits.get(layer)
            if edit is not None:
                x = edit(x)
                args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
            self.hidden[layer] = self._keep(x)
            return (args, kwargs) if edit is not None else None
        return hook

    def _out_hook(self, layer: int):
        def hook(module, args, output):
            x = output if torch.is_tensor(output) else output[0]
            edit = self.edits.get(layer)
            if edit is not None:
                x = edit(x)
                output = x if torch.is_tensor(output) else (x, *output[1:])
            self.hidden[layer] = self._keep(x)
            return output if edit is not None else None
        return hook

    def _attention_tap(self, layer: int):
        def tap(module, query, key, value, mask, kwargs):
            scaling = kwargs.get("scaling") or module.scaling
            self.scaling = float(scaling)
            if self.attention_form == "factors":
                self.attention[layer] = (self._keep(query), self._keep(key), self._keep(value))
                return
            scores = attention_scores(query, key, scaling)
            softcap = kwargs.get("softcap")
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            allowed = _allowed_keys(mask, module, query.shape[2], key.shape[2], query.device)
            self.attention[layer] = self._keep(probs_from_scores(scores, allowed))
        return tap
