"""Tiny teachers built from configs (random, seeded) with a word-level tokenizer, and a corpus for them."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
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


# ChatML's shape in the tiny vocabulary: [BOS] role content [EOS], with "you" the user and "me" the assistant
CHAT_TEMPLATE = ("{% for m in messages %}[BOS] {{ {'user': 'you', 'assistant': 'me', 'system': 'we'}[m['role']] }} "
                 "{{ m['content'] }} [EOS] {% endfor %}{% if add_generation_prompt %}[BOS] me {% endif %}")


def make_chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


FAMILIES = ("llama", "gpt2", "qwen2", "mistral", "gemma3", "phi3", "granite", "gpt_neox", "opt", "cohere")
WINDOW = 8  # the sliding window of the windowed families, shorter than the test sequences


def make_model(arch: str, vocab_size: int, layers: int = 3, hidden: int = 32, heads: int = 4, seed: int = 0,
               positions: int = 128, sharpness: float = 1.0):
    """A tiny random model of one architecture family. `sharpness` scales the output head: random models are
    near-uniform, a sharper one has peaked, input-dependent distributions worth distilling. The windowed
    families attend within WINDOW tokens (Qwen2 and Gemma 3 on some layers only); Gemma 3 soft-caps its
    logits, Granite divides them, Cohere scales them."""
    import transformers as tf

    torch.manual_seed(seed)
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=positions, tie_word_embeddings=False, **ids)
    alternating = ["sliding_attention", "full_attention"] * layers
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, num_key_value_heads=heads // 2),
        "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=heads // 2, use_sliding_window=True,
                                        sliding_window=WINDOW, max_window_layers=1),
        "mistral": lambda: tf.MistralConfig(**common, num_key_value_heads=heads // 2, sliding_window=WINDOW),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, num_key_value_heads=heads // 2, head_dim=hidden // heads,
                                              sliding_window=WINDOW, layer_types=alternating[:layers],
                                              final_logit_softcapping=3.0),
        "phi3": lambda: tf.Phi3Config(**common, num_key_value_heads=heads // 2),
        "granite": lambda: tf.GraniteConfig(**common, num_key_value_heads=heads // 2, logits_scaling=4.0),
        "cohere": lambda: tf.CohereConfig(**common, num_key_value_heads=heads // 2, logit_scale=0.5),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=layers, num_attention_heads=heads,
                                             max_position_embeddings=positions, tie_word_embeddings=False, **ids),
        "opt": lambda: tf.OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, max_position_embeddings=positions,
                                    word_embed_proj_dim=hidden, **ids),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                                      n_positions=positions, bos_token_id=2, eos_token_id=3),
        "bert": lambda: tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=2 * hidden,
                                      max_position_embeddings=positions, pad_token_id=0),
    }
    if arch not in configs:
        raise ValueError(arch)
    config = configs[arch]()
    model = (tf.BertForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM.from_config)(config)
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


def real_teacher(locate):
    """(path, model, tokenizer) of a packaged GGUF teacher; the test skips when its package is not installed."""
    import pytest

    from kdpipe.errors import UserError
    from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer, resolve_teacher

    try:
        path = locate()
    except UserError as exc:
        pytest.skip(str(exc))
    return (path, *load_teacher_and_tokenizer(resolve_teacher(str(path))))


def side_by_side(calls: dict) -> dict:
    """Every key's call at once, each in a thread, and their results (a call's exception is raised here): for runs
    of real kdpipe processes, mostly their start-up, which two cores run side by side in about half the time."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {key: pool.submit(call) for key, call in calls.items()}
    return {key: future.result() for key, future in futures.items()}
