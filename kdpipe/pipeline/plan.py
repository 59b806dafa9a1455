"""`kdpipe plan`: what an extraction will need before any GPU hour is spent.

The teacher is built on the meta device (no weights, no memory), so parameter counts and bytes are
exact. Cache bytes are exact before compression (the array shapes are known). Per-GPU memory is the
resident parameter share plus an estimate of the working set; time is an estimate from FLOPs and
parameter-streaming bandwidth. The output marks every estimate as such.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.capture import find_blocks, parse_layers
from kdpipe.errors import UserError
from kdpipe.modelio import ALIASES, load_config, resolve_teacher
from kdpipe.storage import budget
from kdpipe.storage.manifest import stored_temperatures

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

SIGNAL_KEYS = ("hidden", "attention", "signal_positions")  # the --signal-budget's arrays


def parse_size(text: str, unit: str = "B") -> float:
    """'40GB' -> 40e9, '25GB/s' -> 25e9, '1.5TB' -> 1.5e12, '8KB' -> 8e3; plain numbers pass through."""
    t = str(text).strip().upper().removesuffix("/S").removesuffix(unit.upper())
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    for suffix in sorted(scale, key=len, reverse=True):
        if t.endswith(suffix):
            return parse_size(t[: -len(suffix)]) * scale[suffix]
    try:
        value = float(t)
    except ValueError:
        raise UserError(f"cannot read the size {text!r}: use e.g. 40GB or 25GB/s") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"the size {text!r} must be a positive number")
    return value


def teacher_config(spec: str):
    import transformers

    if spec.lower() in PRESETS:
        return transformers.LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": 4096,
                                           **PRESETS[spec.lower()]})
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
            return transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"--teacher {spec} is not a usable config.json ({type(exc).__name__}: {exc})") from None
    if path.is_dir() or path.suffix == ".gguf" or spec in ALIASES:
        return load_config(resolve_teacher(spec))
    raise UserError(f"--teacher {spec}: not a config.json, a model directory or .gguf, or one of {', '.join(PRESETS)}")


def temperature_count(temperatures: list[float], top_k: int, sample_logprobs: bool, sample_temperature: float) -> int:
    """How many logsumexps `kdpipe extract` stores for these flags (T=1 always; see stored_temperatures)."""
    return len(stored_temperatures(temperatures, top_k, sample_logprobs, sample_temperature))


@dataclass
class PlanConfig:
    """What `kdpipe plan` is asked: a teacher, a corpus, the signals, and the machines (flag names)."""
    teacher: str
    tokens: float = 1e9
    seq_len: int = 2048
    batch_size: int = 8  # sequences per forward, per GPU
    top_k: int = 64
    temperatures: int = 2  # how many logsumexps are stored (temperature_count of the flags)
    logit_codec: str = "compact"  # storage.topk_codec, or "float16"
    sample_count: int = 0
    hidden_layers: str = "none"
    attention_layers: str = "none"
    attention_form: str = "factors"
    # compressed hidden states and attention (storage.budget), as `kdpipe extract` takes them
    signal_budget: float | None = None  # bytes per token for both
    hidden_codec: str = "float16"
    hidden_rank: int = 0
    attention_codec: str = "float16"
    attention_rank: int = 0
    signal_fraction: float = 1.0
    position_fraction: float = 1.0
    sequences_per_unit: int = 16
    gpus: int = 1
    gpu_memory: float = 80e9
    dtype: str = "bfloat16"
    offload: str = "none"
    bandwidth: float = 25e9  # parameter streaming from CPU RAM / NVMe, per GPU
    interconnect: float = 150e9  # all-gather bandwidth between GPUs, per GPU (NVLink)
    memory_bandwidth: float = 2e12  # the GPU's own memory, for element-wise work
    gpu_flops: float = 300e12  # sustained dense FLOP/s in dtype
    logit_rows: int = 512
    sample_logprobs: bool = True  # the drawn ids' 8-bit log-probabilities (--no-sample-logprobs: none)

    def check(self) -> None:
        checks = [(self.tokens >= 1, "--tokens must be at least 1"), (self.seq_len > 0, "--seq-len must be positive"),
                  (self.batch_size > 0, "--batch-size must be positive"), (self.top_k >= 0, "--top-k must be 0 or more"),
                  (self.logit_codec in ("compact", "float16"), "--logit-codec must be compact or float16"),
                  (self.temperatures >= 1, "--temperatures needs at least one"),
                  (self.sample_count >= 0, "--sample-count must be 0 or more"),
                  (self.gpus >= 1, "--gpus must be at least 1"), (self.gpu_memory > 0, "--gpu-memory must be positive"),
                  (min(self.bandwidth, self.interconnect, self.memory_bandwidth, self.gpu_flops) > 0,
                   "bandwidths and --gpu-tflops must be positive"),
                  (self.logit_rows > 0, "--logit-rows must be positive"),
                  (self.dtype in DTYPE_BYTES, f"--dtype must be one of {', '.join(DTYPE_BYTES)}"),
                  (self.offload in ("none", "cpu", "nvme"), "--offload must be none, cpu or nvme"),
                  (self.attention_form in ("probs", "factors"), "--attention-form must be probs or factors"),
                  (self.sequences_per_unit > 0, "--sequences-per-unit must be positive"),
                  (self.signal_budget is None or self.signal_budget > 0, "--signal-budget must be positive, e.g. 8KB"),
                  (self.signal_budget is None or (self.hidden_codec, self.hidden_rank, self.attention_codec,
                                                  self.attention_rank, self.signal_fraction, self.position_fraction)
                   == ("float16", 0, "float16", 0, 1.0, 1.0),
                   "--signal-budget chooses --hidden-codec, --hidden-rank, --attention-codec, --attention-rank, "
                   "--signal-fraction and --position-fraction: give the budget or those, not both"),
                  (min(self.hidden_rank, self.attention_rank) >= 0 and 0 < self.signal_fraction <= 1
                   and 0 < self.position_fraction <= 1,
                   "--hidden-rank and --attention-rank must be 0 or more, --signal-fraction and --position-fraction "
                   "in (0, 1]"),
                  (self.attention_codec == "float16" or self.attention_form == "factors",
                   "--attention-codec int8 codes Q/K/V factors: for --attention-form probs use uint8 probabilities")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


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


# passes over a B*T x V float32 logits slice per extra stored temperature, and for the sampled draws
# (storage-side reasons in stage1_extract.logits): top-k read, shift, exp and sum at T=1 = 6 passes
LOGIT_PASSES, PASSES_PER_TEMPERATURE, SAMPLING_PASSES = 6, 3, 4


# what each logits mode came to after compression on real text (bench/RESULTS.md, SmolLM2 over Milton, k=64,
# T = 1,2; sampled: M=12), since compression depends on the teacher and the text and a plan cannot run either
LOGITS_NOTE = {"compact top-k": "compact top-k, measured ~98 B/token after compression (SmolLM2, k=64, real text)",
               "float16 top-k": "float16 top-k, measured ~197 B/token after compression (SmolLM2, k=64, real text)",
               "sampled": "importance-sampled, measured ~28 B/token after compression (SmolLM2, M=12, real text)",
               "sampled, no log-probabilities": "importance-sampled without log-probabilities, measured ~17 B/token "
                                                "after compression (SmolLM2, M=12; ~26 at M=24, real text)"}


def make_plan(c: PlanConfig) -> Plan:
    import torch
    import transformers

    c.check()
    config = teacher_config(c.teacher)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    largest = max(p.numel() for p in model.parameters())
    layers = config.num_hidden_layers
    block = sum(p.numel() for p in find_blocks(model)[0].parameters())
    h, vocab, heads = config.hidden_size, config.vocab_size, config.num_attention_heads
    inter = getattr(config, "intermediate_size", None) or 4 * h
    kv = getattr(config, "num_key_value_heads", heads) or heads
    d = getattr(config, "head_dim", None) or h // heads
    nbytes = DTYPE_BYTES[c.dtype]
    param_bytes = params * nbytes
    offloaded = c.offload in ("cpu", "nvme")

    # cache bytes per token, exact before compression
    ids = 2 if vocab <= 65536 else 4
    compact = c.logit_codec == "compact" and c.top_k > 0
    compact_sampled = c.logit_codec == "compact" and c.sample_count > 0
    if compact:  # rank gaps and 8-bit levels; float32 logsumexp at T=1, float16 log-norms and log tails
        logit_bytes = c.top_k * (ids + 1) + 4 + 2 * (c.temperatures - 1) + 2 * c.temperatures
    elif compact_sampled and not c.top_k:  # draws alone: float32 logsumexp at T=1, float16 log-norms
        logit_bytes = 4 + 2 * (c.temperatures - 1)
    else:  # top-k ids and float16 log-probabilities; float32 logsumexp and log tail mass per temperature
        logit_bytes = c.top_k * (ids + 2) + (8 if c.top_k else 4) * c.temperatures
    per_token = {"tokens": 4 + 4 / c.seq_len, "logits": logit_bytes}
    if c.sample_count:  # distinct ids (rank gaps), counts (uint8 compact, uint16 raw), 8-bit log-probabilities
        counts = (1 if c.sample_count <= 255 else 2) if compact_sampled else 2
        per_token["sampled"] = min(c.sample_count, vocab) * (ids + counts + int(c.sample_logprobs))
    n_hidden = len(parse_layers(c.hidden_layers, layers, 0, "hidden"))
    n_attn = len(parse_layers(c.attention_layers, layers, 1, "attention"))
    shapes = budget.Shapes(h, n_hidden, n_attn, heads, kv, d, c.seq_len, c.attention_form if n_attn else None,
                           c.sequences_per_unit)
    signals = budget.fit(c.signal_budget, shapes) if c.signal_budget is not None else \
        budget.from_flags(c.hidden_codec, c.hidden_rank, c.attention_codec, "float16", c.signal_fraction, shapes,
                          c.position_fraction, c.attention_rank)
    per_token.update(budget.bytes_per_token(signals, shapes))
    exact_signals = sum(budget.bytes_per_token(budget.Settings(), shapes).values()) if n_hidden or n_attn else 0
    logit_mode = "sampled" if not c.top_k else ("compact top-k" if compact else "float16 top-k")
    sequences = math.ceil(c.tokens / c.seq_len)
    cache_bytes = {k: v * sequences * c.seq_len for k, v in per_token.items()}
    if compact or compact_sampled:
        cache_bytes["logits"] += vocab * ids  # the rank -> id table, once
    if signals.hidden_codec == "int8":  # each layer's channel code and projection, once
        cache_bytes["hidden"] += n_hidden * h * (2 + signals.hidden_rank) * 4
    if signals.attention_rank:  # each layer's Q/K/V center, encoder and decoder, once
        cache_bytes["attention"] += n_attn * (heads + 2 * kv) * d * (1 + 2 * signals.attention_rank) * 4

    # per-GPU memory: resident parameter share + working set (estimate)
    resident = 0 if offloaded else param_bytes / c.gpus
    gathered = 2 * block * nbytes  # the block in use and the one prefetched
    btok = c.batch_size * c.seq_len
    activations = btok * (4 * h + 2 * inter) * nbytes
    logits = min(c.logit_rows, btok) * vocab * 4 * 2
    captured = btok * exact_signals * 2  # float32 on the device until encoded, whatever is stored
    overhead = 1.5e9  # CUDA context, allocator slack
    per_gpu = resident + gathered + activations + logits + captured + overhead
    fits = per_gpu <= c.gpu_memory

    # time per batch (estimate), each GPU running its own batches. Compute: the matmuls (2 x parameters
    # per token, plus attention), and the element-wise work that moves memory instead: the passes over the
    # vocabulary for the logsumexp, temperatures and draws, and each block's norms, activations and residuals
    flops = 2 * params * btok + 4 * layers * btok * c.seq_len * h
    passes = LOGIT_PASSES + PASSES_PER_TEMPERATURE * (c.temperatures - 1) + (SAMPLING_PASSES if c.sample_count else 0)
    elementwise = btok * vocab * 4 * passes + btok * layers * (8 * h + 4 * inter) * nbytes
    compute_s = flops / c.gpu_flops + elementwise / c.memory_bandwidth
    # ZeRO-3 keeps 1/G of the parameters per GPU (on it, or offloaded): each forward brings a GPU's own
    # share in from CPU/NVMe and gathers the other (G-1)/G from the other GPUs; prefetching overlaps both
    # with compute, so the slowest of the three sets the pace
    stream_s = param_bytes / c.gpus / c.bandwidth if offloaded else 0.0
    gather_s = param_bytes * (c.gpus - 1) / c.gpus / c.interconnect
    terms = {"compute": compute_s, "parameter streaming": stream_s, "all-gather between GPUs": gather_s}
    bound = max(terms, key=terms.get)
    batches_per_gpu = math.ceil(sequences / (c.batch_size * c.gpus))
    total_s = batches_per_gpu * terms[bound]

    why = (f"needs {_gb(per_gpu)} of {_gb(c.gpu_memory)}" + (f" (parameters offloaded to {c.offload})" if offloaded
                                                               else f" ({_gb(param_bytes / c.gpus)} of parameters per GPU)"))
    lines = [
        ("teacher", f"{c.teacher}: {params / 1e9:,.3f}B parameters, {layers} layers, hidden {h}, vocab {vocab}", False),
        ("parameter bytes", f"{_gb(param_bytes)} in {c.dtype}; largest tensor {largest / 1e6:,.1f}M elements "
                            f"(nvme buffer_size must hold it)", False),
        ("offload", {"cpu": f"{_gb(param_bytes)} of parameters in pinned CPU RAM, {_gb(param_bytes / c.gpus)} per GPU",
                     "nvme": f"{_gb(param_bytes)} of parameters on NVMe (plus CPU swap buffers), "
                             f"{_gb(param_bytes / c.gpus)} per GPU"}.get(
            c.offload, f"none: ZeRO-3 partitions the parameters over {c.gpus} GPU(s)"), False),
        ("per-GPU memory", f"{_gb(per_gpu)}: parameters resident {_gb(resident)}, two blocks gathered "
                           f"{_gb(gathered)}, activations {_gb(activations)}, logit slices {_gb(logits)}, "
                           f"captured signals {_gb(captured)}, overhead {_gb(overhead)}", True),
        ("fits", ("yes: " if fits else "NO: ") + why + (
            "" if fits else "; offload parameters (--offload cpu|nvme), add GPUs, or lower --batch-size"), True),
        ("corpus", f"{c.tokens:,.0f} tokens = {sequences:,} sequences of {c.seq_len}", False),
    ]
    note = logit_mode + (", no log-probabilities" if logit_mode == "sampled" and not c.sample_logprobs else "")
    for k, v in cache_bytes.items():
        lines.append((f"cache: {k}", f"{_gb(v)} ({per_token[k]:,.1f} B/token) before compression"
                      + (f"; {LOGITS_NOTE[note]}" if k == "logits" else ""), False))
    if n_hidden or n_attn:
        signal_bytes = sum(per_token.get(k, 0) for k in SIGNAL_KEYS)
        lines.append(("hidden + attention", f"{signals.describe(shapes)}: {signal_bytes:,.0f} B/token "
                                            f"({exact_signals / signal_bytes:.1f}x below exact float16, "
                                            f"{exact_signals:,.0f})", False))
    lines.append(("cache: total", f"{_gb(sum(cache_bytes.values()))} before compression; "
                                  f"full fp16 logits would be {_gb(2 * vocab * sequences * c.seq_len)}", False))
    lines.append(("time per batch", f"compute {compute_s:.2f}s ({flops / 1e12:,.1f} TFLOP at {c.gpu_flops / 1e12:.0f} "
                                    f"TFLOP/s + {elementwise / 1e9:,.1f} GB element-wise at "
                                    f"{c.memory_bandwidth / 1e9:,.0f} GB/s), parameter streaming {stream_s:.2f}s at "
                                    f"{c.bandwidth / 1e9:.0f} GB/s, all-gather {gather_s:.2f}s at "
                                    f"{c.interconnect / 1e9:.0f} GB/s: {bound}-bound", True))
    lines.append(("extraction time", f"{total_s / 3600:,.1f} hours on {c.gpus} GPU(s) "
                                     f"({batches_per_gpu:,} batches of {c.batch_size} per GPU)", True))
    data = {"logits_mode": logit_mode, "params": params, "param_bytes": param_bytes, "largest_tensor": largest, "per_gpu_bytes": per_gpu,
            "fits": fits, "cache_bytes": cache_bytes, "cache_bytes_per_token": per_token,
            "signal_settings": {**dataclasses.asdict(signals), "describe": signals.describe(shapes),
                                "signal_budget": c.signal_budget,
                                "bytes_per_token": sum(per_token.get(k, 0) for k in SIGNAL_KEYS),
                                "exact_bytes_per_token": exact_signals},
            "seconds_per_batch": terms[bound], "seconds_by_term": terms, "total_seconds": total_s, "bound": bound}
    return Plan(lines=lines, fits=fits, data=data)
