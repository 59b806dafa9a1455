"""`kdpipe plan` against a measured extraction on this machine: parameters and cache bytes must match
exactly; time is an estimate, reported as the ratio measured / planned.

    python bench/plan_check.py [--sequences 32] [--seq-len 256]

The plan is told this machine as its "GPU", measured here: sustained FLOP/s of a matmul of the teacher's
MLP shape (what --gpu-tflops means) and the memory bandwidth of a large copy (--memory-bandwidth);
no offload, one device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.modelio import resolve_teacher
from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.pipeline.plan import PlanConfig, make_plan
from kdpipe.pipeline.report import cache_summary
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer


def matmul_flops(rows: int, inner: int, cols: int, repeats: int = 20) -> float:
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start)


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes read plus written per second by a large copy."""
    x = torch.randn(nbytes // 4)
    x.clone()
    start = time.perf_counter()
    for _ in range(repeats):
        x.clone()
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    signals = dict(top_k=64, temperatures=[1.0, 2.0], sample_count=32, hidden_layers="uniform:3",
                   attention_layers="last:2", attention_form="factors")

    path = str(smollm2_gguf())
    source = resolve_teacher(path)
    model, tokenizer = load_teacher_and_tokenizer(source)
    work = Path(tempfile.mkdtemp(prefix="kdpipe-plan-"))
    seconds = []
    for run in range(2):  # the first run also pays one-off warm-up (thread pools, allocator) the plan does not model
        out = work / f"cache{run}"
        result = extract(ExtractConfig(teacher=path, data=[str(DEMO_CORPUS)], out=str(out), seq_len=args.seq_len,
                                       batch_size=args.batch_size, max_sequences=args.sequences, quiet=True,
                                       **signals), model, tokenizer)
        seconds.append(result.seconds)
    cfg = model.config
    flops = matmul_flops(args.batch_size * args.seq_len, cfg.hidden_size, cfg.intermediate_size)
    memory = copy_bandwidth()
    tokens = args.sequences * args.seq_len
    plan = make_plan(PlanConfig("smollm2-135m", tokens, args.seq_len, args.batch_size, signals["top_k"], 2,
                                signals["sample_count"], signals["hidden_layers"], signals["attention_layers"],
                                "factors", gpu_memory=24e9, dtype="float32", gpu_flops=flops,
                                memory_bandwidth=memory)).data

    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    raw: dict[str, int] = {}
    for a in cache_summary(str(out))["arrays"]:
        group = a["name"].split("/")[0]
        raw[group] = raw.get(group, 0) + a["raw_bytes"]
    print(f"SmolLM2-135M, {args.sequences} x {args.seq_len} tokens, this CPU at {flops / 1e9:.0f} GFLOP/s (fp32 "
          f"matmul of the MLP's shape) and {memory / 1e9:.1f} GB/s (copy)")
    print(f"{'quantity':28} {'planned':>16} {'measured':>16} {'measured/planned':>17}")
    rows = [("parameters", plan["params"], params), ("parameter bytes (fp32)", plan["param_bytes"], params * 4)]
    rows += [(f"cache bytes: {k}", plan["cache_bytes"][k], raw[k]) for k in plan["cache_bytes"]]
    rows += [("extraction seconds, run 1", plan["total_seconds"], seconds[0]),
             ("extraction seconds, run 2", plan["total_seconds"], seconds[1])]
    terms = ", ".join(f"{k} {v:.2f}s" for k, v in plan["seconds_by_term"].items())
    for name, planned, measured in rows:
        print(f"{name:28} {planned:16,.1f} {measured:16,.1f} {measured / planned:17.3f}")
    print(f"planned per batch: {terms}")


if __name__ == "__main__":
    main()
