"""`kdpipe plan`: what an extraction will need before any GPU hour is spent.

The teacher is built on the meta device (no weights, no memory), so parameter counts and bytes are
exact. Cache bytes are exact before compression (the array shapes are known). Per-GPU memory is the
resident parameter share plus an estimate of the working set; time is an estimate from FLOPs and
parameter-streaming bandwidth. The output marks every estimate as such.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.capture import find_blocks, parse_layers
from kdpipe.errors import UserError

# Llama-shaped presets (vocabulary 32000): the sizes users ask about
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8),
    "llama-100b": dict(hidden_size=9216, intermediate_size=32768, num_hidden_layers=91, num_attention_heads=72,
                       num_key_value_heads=8),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_size(text: str, unit: str = "B") -> float:
    """'40GB' -> 40e9, '25GB/s' -> 25e9, '1.5TB' -> 1.5e12; plain numbers pass through."""
    t = str(text).strip().upper().removesuffix("/S").removesuffix(unit.upper())
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    for suffix in sorted(scale, key=len, reverse=True):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale[suffix]
    try:
        return float(t)
    except ValueError:
        raise UserError(f"cannot read the size {text!r}: use e.g. 40GB or 25GB/s") from None


def teacher_config(spec: str):
    import transformers

    if spec.lower() in PRESETS:
        return transformers.LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": 4096,
                                           **PRESETS[spec.lower()]})
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--teacher {spec}: not a config.json, a model directory, or one of {', '.join(PRESETS)}")
    raw = json.loads(path.read_text())
    return transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)


@dataclass
class Plan:
    lines: list[tuple[str, str, bool]]  # (what, value, is an estimate)
    fits: bool
    data: dict[str, Any]

    def format(self) -> str:
        width = max(len(w) for w, _, _ in self.lines)
        out = [f"{w:{width}}  {v}{'   [estimate]' if est else ''}" for w, v, est in self.lines]
        return "\n".join(out)


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def make_plan(teacher: str, tokens: float, seq_len: int, batch_size: int, top_k: int, temperatures: int,
              sample_count: int, hidden_layers: str, attention_layers: str, attention_form: str, gpus: int,
              gpu_memory: float, dtype: str, offload: str, bandwidth: float, gpu_flops: float,
              logit_rows: int) -> Plan:
    import torch
    import transformers

    config = teacher_config(teacher)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    largest = max(p.numel() for p in model.parameters())
    layers = config.num_hidden_layers
    block = sum(p.numel() for p in find_blocks(model)[0].parameters())
    h, vocab, heads = config.hidden_size, config.vocab_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    d = getattr(config, "head_dim", None) or h // heads
    nbytes = DTYPE_BYTES[dtype]
    param_bytes = params * nbytes

    # cache bytes per token, exact before compression
    ids = 2 if vocab <= 65536 else 4
    per_token = {"tokens": 4 + 4 / seq_len, "logits": top_k * (ids + 2) + 4 * temperatures}
    if sample_count:
        per_token["sampled"] = min(sample_count, vocab) * (ids + 2)
    n_hidden = len(parse_layers(hidden_layers, layers, 0, "hidden"))
    n_attn = len(parse_layers(attention_layers, layers, 1, "attention"))
    if n_hidden:
        per_token["hidden"] = n_hidden * h * 2
    if n_attn:
        per_token["attention"] = n_attn * (heads * seq_len * 2 if attention_form == "probs" else (heads + 2 * kv) * d * 2)
    sequences = math.ceil(tokens / seq_len)
    cache_bytes = {k: v * sequences * seq_len for k, v in per_token.items()}

    # per-GPU memory: resident parameter share + working set (estimate)
    resident = 0 if offload in ("cpu", "nvme") else param_bytes / gpus
    gathered = 2 * block * nbytes  # the block in use and the one prefetched
    btok = batch_size * seq_len
    activations = btok * (4 * h + 2 * config.intermediate_size) * nbytes
    logits = min(logit_rows, btok) * vocab * 4 * 2
    captured = btok * sum(per_token.get(k, 0) for k in ("hidden", "attention")) * 2
    overhead = 1.5e9  # CUDA context, allocator slack
    per_gpu = resident + gathered + activations + logits + captured + overhead
    fits = per_gpu <= gpu_memory

    # time (estimate): each GPU runs its own batches; a forward needs 2 * params FLOPs per token plus
    # attention, and under offload streams every parameter byte from CPU/NVMe once per forward
    flops_per_batch = 2 * params * btok + 4 * layers * btok * seq_len * h
    compute_s = flops_per_batch / gpu_flops
    stream_s = param_bytes / bandwidth if offload in ("cpu", "nvme") else 0.0
    batches_per_gpu = math.ceil(sequences / (batch_size * gpus))
    total_s = batches_per_gpu * max(compute_s, stream_s)
    bound = "parameter streaming" if stream_s > compute_s else "compute"

    why = (f"needs {_gb(per_gpu)} of {_gb(gpu_memory)}" + (" (parameters offloaded to " + offload + ")"
                                                            if offload in ("cpu", "nvme") else
                                                            f" ({_gb(param_bytes / gpus)} of parameters per GPU)"))
    lines = [
        ("teacher", f"{teacher}: {params / 1e9:,.3f}B parameters, {layers} layers, hidden {h}, vocab {vocab}", False),
        ("parameter bytes", f"{_gb(param_bytes)} in {dtype}; largest tensor {largest / 1e6:,.1f}M elements "
                            f"(nvme buffer_size must hold it)", False),
        ("offload", {"cpu": f"{_gb(param_bytes)} of parameters in pinned CPU RAM",
                     "nvme": f"{_gb(param_bytes)} of parameters on NVMe (plus CPU swap buffers)"}.get(
            offload, f"none: ZeRO-3 partitions the parameters over {gpus} GPU(s)"), False),
        ("per-GPU memory", f"{_gb(per_gpu)}: parameters resident {_gb(resident)}, two blocks gathered "
                           f"{_gb(gathered)}, activations {_gb(activations)}, logit slices {_gb(logits)}, "
                           f"captured signals {_gb(captured)}, overhead {_gb(overhead)}", True),
        ("fits", ("yes: " if fits else "NO: ") + why + (
            "" if fits else "; offload parameters (--offload cpu|nvme), add GPUs, or lower --batch-size"), True),
        ("corpus", f"{tokens:,.0f} tokens = {sequences:,} sequences of {seq_len}", False),
    ]
    for k, v in cache_bytes.items():
        lines.append((f"cache: {k}", f"{_gb(v)} ({per_token[k]:,.1f} B/token) before compression", False))
    lines.append(("cache: total", f"{_gb(sum(cache_bytes.values()))} before compression; "
                                  f"full fp16 logits would be {_gb(2 * vocab * sequences * seq_len)}", False))
    lines.append(("time per batch", f"compute {compute_s:.2f}s at {gpu_flops / 1e12:.0f} TFLOP/s, parameter streaming "
                                    f"{stream_s:.2f}s at {bandwidth / 1e9:.0f} GB/s: {bound}-bound", True))
    lines.append(("extraction time", f"{total_s / 3600:,.1f} hours on {gpus} GPU(s) "
                                     f"({batches_per_gpu:,} batches of {batch_size} per GPU)", True))
    data = {"params": params, "param_bytes": param_bytes, "largest_tensor": largest, "per_gpu_bytes": per_gpu,
            "fits": fits, "cache_bytes": cache_bytes, "cache_bytes_per_token": per_token,
            "seconds_per_batch": max(compute_s, stream_s), "total_seconds": total_s, "bound": bound}
    return Plan(lines=lines, fits=fits, data=data)
