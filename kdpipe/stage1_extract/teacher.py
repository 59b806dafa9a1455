"""The teacher's tokenizer, the manifest's description of teacher and tokenizer, and GGUF export.
Loading weights (the `hf` engine) lives in `kdpipe.modelio`, which stage 2 shares."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from kdpipe.capture import find_blocks, self_attention, text_config
from kdpipe.modelio import ALIASES, TeacherSource, gguf_parsed_once, load_teacher, resolve_teacher  # noqa: F401
from kdpipe.errors import UserError
from kdpipe.storage.fingerprint import (config_fingerprint, files_fingerprint, tokenizer_fingerprint,
                                        vocab_fingerprint, weight_files)
from kdpipe.storage.manifest import TeacherInfo, TokenizerInfo

def load_tokenizer(path: str | None, source: TeacherSource, trust_remote_code: bool = False):
    import transformers

    if path and (path in ALIASES or path.endswith(".gguf")):  # a GGUF file carries its tokenizer
        source, path = resolve_teacher(path), None
    where = Path(path) if path else source.directory
    kwargs = {} if path else source.load_kwargs()
    try:
        return transformers.AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot load a tokenizer from {where} ({type(exc).__name__}): pass --tokenizer") from None


def load_teacher_and_tokenizer(source: TeacherSource):
    """(model, tokenizer) of a teacher in float32 on the CPU; a GGUF file's metadata parsed once for both."""
    with gguf_parsed_once():
        return load_teacher(source), load_tokenizer(None, source)


def check_tokenizer(tokenizer, source: TeacherSource, name: str, trust_remote_code: bool = False) -> None:
    """A --tokenizer other than the teacher's own must map text to the same ids: the teacher reads ids, and
    another vocabulary's ids would be other tokens to it. Compared with the teacher's own tokenizer where it
    has one."""
    try:
        own = load_tokenizer(None, source, trust_remote_code)
    except UserError:
        return  # the teacher ships no tokenizer: the size check against its vocabulary still applies
    if vocab_fingerprint(own.get_vocab()) != vocab_fingerprint(tokenizer.get_vocab()):
        raise UserError(f"--tokenizer {name} has another vocabulary than the teacher's own tokenizer ({len(tokenizer)} "
                        f"vs {len(own)} tokens, or the same tokens under other ids): the teacher would read its ids as "
                        f"other tokens; leave --tokenizer out to use the teacher's")


def saved_files(tokenizer) -> dict[str, bytes]:
    """The files `save_pretrained` writes for this tokenizer (name: bytes), to keep in the cache."""
    import tempfile

    from kdpipe.storage.manifest import SAFE_NAME

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())
                if p.is_file() and p.stat().st_size and SAFE_NAME.match(p.name)}


def max_positions(model: nn.Module) -> int | None:
    cfg = text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def weights_fingerprint(source: TeacherSource) -> str:
    files = weight_files(source.directory, source.gguf_file)
    if not files:
        raise UserError(f"teacher {source.name} has no weight files (.safetensors, .bin, .gguf)")
    return files_fingerprint(files, source.directory)


def describe_teacher(model: nn.Module, name: str, dtype: str, weights_sha256: str = "") -> TeacherInfo:
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    blocks = find_blocks(model)
    attn = self_attention(blocks[0])
    return TeacherInfo(
        name=name,
        architecture=type(model).__name__,
        num_layers=len(blocks),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=_rows(model.get_output_embeddings().weight),
        dtype=dtype,
        config_sha256=config_fingerprint(json.loads(cfg.to_json_string(use_diff=False))),
        weights_sha256=weights_sha256,
        config=json.loads(model.config.to_json_string(use_diff=False)),
        max_positions=max_positions(model),
        causal=bool(getattr(attn, "is_causal", True)),
    )


def _rows(weight: torch.Tensor) -> int:
    """Rows of a weight, also when ZeRO-3 has partitioned it away (its full shape is then `ds_shape`)."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def describe_tokenizer(tokenizer, name: str) -> TokenizerInfo:
    specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    return TokenizerInfo(name=name, vocab_sha256=vocab_fingerprint(tokenizer.get_vocab()),
                         vocab_size=len(tokenizer), special_ids=specials, sha256=tokenizer_fingerprint(tokenizer))


def configure_threads() -> None:
    """Leave one core to the writer thread's compression when torch would take them all."""
    if "OMP_NUM_THREADS" not in os.environ and (os.cpu_count() or 1) > 2:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))


def export_gguf(source: TeacherSource, out: Path) -> Path:
    """Write a GGUF teacher as a safetensors model directory (with its tokenizer), so that engines that
    build the model themselves (DeepSpeed's zero.Init) can load it. transformers refuses to
    `save_pretrained` a GGUF-loaded model, so its weights go into a fresh model of the same config."""

    model, tokenizer = load_teacher_and_tokenizer(source)
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.config.quantization_config = None
    if hasattr(fresh.config, "quantization_config"):
        del fresh.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
