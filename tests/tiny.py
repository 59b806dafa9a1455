"""Tiny teachers built from configs (random, seeded) with a word-level tokenizer, and a corpus for them."""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import torch

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def make_model(arch: str, vocab_size: int, layers: int = 3, hidden: int = 32, heads: int = 4, seed: int = 0,
               positions: int = 128, sharpness: float = 1.0):
    """`sharpness` scales the output head: random models are near-uniform, a sharper one has peaked,
    input-dependent distributions worth distilling."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                                max_position_embeddings=positions, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                               n_positions=positions, bos_token_id=2, eos_token_id=3)
        model = tf.GPT2LMHeadModel(config)
    elif arch == "bert":
        config = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=2 * hidden,
                               max_position_embeddings=positions, pad_token_id=0)
        model = tf.BertForMaskedLM(config)
    else:
        raise ValueError(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpness)
    return model.eval()


def save_teacher(directory: Path, arch: str = "llama", seed: int = 0, **kwargs) -> Path:
    tokenizer = make_tokenizer()
    model = make_model(arch, len(tokenizer), seed=seed, **kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_corpus(directory: Path, docs: int = 12, words: int = 150, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
        (directory / f"doc{i:02d}.txt").write_text(text + "\n")
    return directory


@contextmanager
def small_disk(tmp_path: Path, size: str):
    """A tmpfs of `size` mounted at tmp_path/disk (root only; the test skips elsewhere), yielding the mount
    point and a function that resizes it."""
    import os
    import shutil
    import subprocess

    import pytest

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk, lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(disk)], check=True)
    finally:
        subprocess.run(["umount", str(disk)])
