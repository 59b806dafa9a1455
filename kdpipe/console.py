"""What kdpipe says on the terminal, and what it lets the libraries under it say.

kdpipe's own notes go to stderr as `kdpipe: ...` (stdout stays for results); `--quiet` silences progress
bars, kdpipe's and the libraries' (transformers' GGUF de-quantization and "Writing model shards").
"""

from __future__ import annotations

import functools
import os
import sys


def say(message: str) -> None:
    """A note for the user (a warning, a decision kdpipe took), on stderr."""
    print(f"kdpipe: {message}", file=sys.stderr, flush=True)


def prepare_environment() -> None:
    """Before DeepSpeed is first imported (transformers imports it): on a machine without CUDA, tell it
    the accelerator is the CPU, which it would pick anyway, instead of letting it warn on every command."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def quiet_libraries() -> None:
    """--quiet: no progress bars or info chatter from transformers (errors still show)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # GGUF de-quantization draws its bar with tqdm itself, past transformers' switch
    from transformers import modeling_gguf_pytorch_utils as gguf

    if hasattr(gguf, "tqdm") and not isinstance(gguf.tqdm, functools.partial):
        gguf.tqdm = functools.partial(gguf.tqdm, disable=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def metric(key: str, value: float) -> str:
    """One held-out metric as people read it: agreement in percent, perplexity to 0.1, the rest in nats."""
    name = key.split("/")[-1]
    if "agreement" in name:
        return f"{value:.1%}"
    if name == "ppl":
        return f"{value:.1f}"
    return f"{value:.4f}"


def metrics_change(before: dict, after: dict) -> str:
    """`ce 5.0123 -> 4.2100, ppl 150.3 -> 67.4, ...` (a key missing before is shown alone)."""
    return ", ".join(f"{k.split('/')[-1]} {metric(k, before[k])} -> {metric(k, v)}" if k in before
                     else f"{k.split('/')[-1]} {metric(k, v)}" for k, v in after.items())
