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
from kdpipe.storage.attention import attention_scores, key_mask, probs_from_scores

_PREFIX = "kdpipe+"


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the outermost ModuleList with one entry per layer."""
    return _blocks_and_owner(model)[0]


def final_module(model: nn.Module) -> nn.Module:
    """The module whose output is the final hidden state (`hidden_states[-1]`, after the last norm): the one
    that holds the blocks (LlamaModel, GPT2Model, OPTDecoder...). Hooking the base model instead misses
    models whose causal-LM forward calls an inner module directly (OPT calls its decoder)."""
    return _blocks_and_owner(model)[1]


def _blocks_and_owner(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    n = text_config(model).num_hidden_layers
    owners = {id(child): parent for parent in model.modules() for child in parent.children()}
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module, owners[id(module)]
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


def _allowed_keys(mask: torch.Tensor | None, module: nn.Module, tq: int, tk: int, device,
                  sliding_window: int | None = None) -> torch.Tensor | None:
    """The boolean allowed-key mask the model used, from whatever form its attention function got (flash
    attention gets its sliding window as an argument rather than in the mask)."""
    causal = getattr(module, "is_causal", True)
    tri = key_mask(tq, tk, True, None, device, sliding_window or 0)
    if mask is None:  # sdpa/flash pass no mask when plain causal (or no) masking is meant
        return tri if causal and tq > 1 else None
    if mask.dim() == 2:  # flash-style key padding mask [B, Tk]
        keep = mask.bool()[:, None, None, :]
        return keep & tri if causal else keep
    mask = mask[..., :tk]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed & tri if sliding_window else allowed


class Capture:
    """While active, forward passes of `model` record the chosen hidden layers and attention layers.

    `attention_form`: "probs" records post-softmax maps [B, h, T, T] (float32); "factors" records the
    post-RoPE (q, k, v) handed to the attention function ([B, h, T, d], k/v with the model's KV heads).
    `detach=False` keeps the autograd graph (a student being trained).
    `edits` intervene: edits[i](h) replaces hidden layer i (0 .. L-1) before the next block reads it
    (Theseus' module replacement, DIITO's interchange); what is recorded is the edited state.
    For every tapped block, `masks[i]` is the boolean allowed-key mask [B or 1, 1, T, T] the model applied
    (its sliding window included) and `softcaps[i]` its attention soft-capping, so that attention rebuilt
    from factors uses the model's own mask, never a plain causal one.
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
        self.masks: dict[int, torch.Tensor | None] = {}
        self.softcaps: dict[int, float | None] = {}
        self.scaling: float | None = None
        self.scalings: dict[int, float] = {}  # block -> the softmax scale its attention call really used
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
                self._handles.append(final_module(self.model).register_forward_hook(self._out_hook(layer)))
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
        self.masks.clear()
        self.softcaps.clear()
        self.scalings.clear()

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
            # the scale the call passes wins: OPT scales its queries itself and calls with scaling=1.0
            scaling = kwargs.get("scaling")
            self.scaling = self.scalings[layer] = float(module.scaling if scaling is None else scaling)
            softcap = kwargs.get("softcap") or None
            allowed = _allowed_keys(mask, module, query.shape[2], key.shape[2], query.device,
                                    kwargs.get("sliding_window"))
            self.masks[layer], self.softcaps[layer] = allowed, softcap
            if self.attention_form == "factors":
                self.attention[layer] = (self._keep(query), self._keep(key), self._keep(value))
                return
            scores = attention_scores(query, key, self.scaling, softcap)
            self.attention[layer] = self._keep(probs_from_scores(scores, allowed))
        return tap
