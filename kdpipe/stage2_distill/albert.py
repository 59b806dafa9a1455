"""ALBERT-style students (Lan et al. 2020, "ALBERT: A Lite BERT for Self-supervised Learning of Language
Representations"): factorized embeddings and cross-layer parameter sharing, on any Hugging Face
causal LM that keeps its blocks in one ModuleList.

- Factorized embeddings: tokens -> V x E table -> E x H projection; the output head mirrors it
  (H -> E, then the same V x E table), so the vocabulary costs V*E + 2*E*H parameters, not 2*V*H.
- Cross-layer sharing: every block position runs one shared block (`share` = how many distinct
  blocks, cycled: 1 is ALBERT's all-shared). Each position is its own thin wrapper, so hooks and
  attention taps still see layers one by one.

The student trains in this form with every method. `export` writes a plain model of the same
architecture that computes the same function (the factors multiplied out, shared blocks copied), so
the saved student loads with `AutoModelForCausalLM` and needs nothing from kdpipe.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdpipe.capture import find_blocks, text_config


class FactorizedEmbedding(nn.Module):
    def __init__(self, vocab: int, size: int, hidden: int):
        super().__init__()
        self.table = nn.Embedding(vocab, size)
        self.up = nn.Linear(size, hidden, bias=False)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.table(ids))


class FactorizedHead(nn.Module):
    """H -> E -> logits through the embedding table (ALBERT ties its output to its input table)."""

    def __init__(self, embedding: FactorizedEmbedding, hidden: int):
        super().__init__()
        self.down = nn.Linear(hidden, embedding.table.weight.shape[1], bias=False)
        self.embedding = [embedding]  # a list, so the table is registered once (under the model's embeddings)

    @property
    def weight(self) -> torch.Tensor:  # what get_output_embeddings().weight means: V x H
        return self.embedding[0].table.weight @ self.down.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(h) @ self.embedding[0].table.weight.T


class SharedBlock(nn.Module):
    """One position of a shared block: hooks and attention taps on it fire for this position only."""
    kdpipe_shared = True  # capture.Capture sets attention taps on the position, not the shared module

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        from kdpipe.capture import self_attention

        # a KV cache is indexed by layer: shared positions would all write the shared block's slot
        kwargs = {k: (None if k in ("past_key_values", "past_key_value") else v) for k, v in kwargs.items()}
        attention = self_attention(self.block)
        tap, saved = getattr(self, "_kdpipe_tap", None), getattr(attention, "_kdpipe_tap", None)
        if tap is not None:
            attention._kdpipe_tap = tap
        try:
            return self.block(*args, **kwargs)
        finally:
            if tap is not None:
                attention._kdpipe_tap = saved
                if saved is None:
                    del attention._kdpipe_tap


def albertize(model: nn.Module, embedding_size: int = 0, share: int = 1) -> str:
    """Turn `model` into its ALBERT form in place; returns a description."""
    config = text_config(model)
    blocks = find_blocks(model)
    parts = []
    if share:
        distinct = [blocks[i] for i in range(min(share, len(blocks)))]
        for i in range(len(blocks)):
            blocks[i] = SharedBlock(distinct[i % len(distinct)])
        parts.append(f"{len(distinct)} shared block(s) over {len(blocks)} layers")
    if embedding_size:
        embedding = FactorizedEmbedding(config.vocab_size, embedding_size, config.hidden_size)
        model.set_input_embeddings(embedding)
        model.set_output_embeddings(FactorizedHead(embedding, config.hidden_size))
        config.tie_word_embeddings = False
        parts.append(f"factorized embeddings {config.vocab_size}x{embedding_size}x{config.hidden_size}")
    model.config.use_cache = False  # see SharedBlock.forward; the exported plain model caches as usual
    model.kdpipe_albert = True
    return "ALBERT-style: " + ", ".join(parts)


@torch.no_grad()
def export(model: nn.Module) -> nn.Module:
    """A plain model of the same architecture computing the same function."""
    import transformers

    config = copy.deepcopy(model.config)
    config.use_cache = True
    plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.to(next(model.parameters()).dtype)
    source_blocks, target_blocks = find_blocks(model), find_blocks(plain)
    for src, dst in zip(source_blocks, target_blocks):
        dst.load_state_dict((src.block if isinstance(src, SharedBlock) else src).state_dict())
    embed = model.get_input_embeddings()
    skip = set()
    if isinstance(embed, FactorizedEmbedding):
        plain.get_input_embeddings().weight.copy_(embed.table.weight @ embed.up.weight.T)
        plain.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight)
        skip = {n for n, m in model.named_modules() if m is embed or m is model.get_output_embeddings()}
    skip |= {n for n, m in model.named_modules() if isinstance(m, SharedBlock)}
    rest = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in skip)}
    plain.load_state_dict(rest, strict=False)
    return plain
