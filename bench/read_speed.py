"""How fast a student run can read the teacher cache: unsharded (one chunk per work unit, the default)
against sharded (small chunks inside one shard per unit), same data, side by side.

    python bench/read_speed.py [--sequences 64] [--seq-len 256] [--batch-size 8] [--repeats 3]

Extracts the same SmolLM2 cache twice (top-64 logits, 3 hidden layers), then reads every sequence in
batches, units in shuffled order, as a training loop would; prints seconds, tokens/s, MB/s decoded,
and the sharded/unsharded ratio.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.teacher import load_teacher, load_tokenizer, resolve_teacher
from kdpipe.storage.reader import TeacherCache


def read_all(cache: TeacherCache, batch: int, seed: int) -> tuple[float, int]:
    per = cache.manifest.layout.sequences_per_unit
    units = list(range(cache.manifest.layout.num_units))
    random.Random(seed).shuffle(units)
    layers = cache.manifest.signals.hidden_layers
    nbytes = 0
    start = time.perf_counter()
    for unit in units:
        for b0 in range(unit * per, min((unit + 1) * per, cache.num_sequences), batch):
            index = slice(b0, min(b0 + batch, (unit + 1) * per, cache.num_sequences))
            arrays = list(cache.topk_logprobs(index)) + [cache.hidden(layer, index) for layer in layers]
            nbytes += sum(a.nbytes for a in arrays)
    return time.perf_counter() - start, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    teacher = str(smollm2_gguf())
    source = resolve_teacher(teacher)
    model, tokenizer = load_teacher(source), load_tokenizer(None, source)
    work = Path(tempfile.mkdtemp(prefix="kdpipe-read-"))
    layouts = {"unsharded": None, "sharded": 2}
    for name, chunk in layouts.items():
        extract(ExtractConfig(teacher=teacher, data=[str(DEMO_CORPUS)], out=str(work / name), seq_len=args.seq_len,
                              top_k=64, hidden_layers="uniform:3", max_sequences=args.sequences,
                              sequences_per_unit=16, sequences_per_chunk=chunk, quiet=True), model, tokenizer)
    del model

    best = {}
    for name in layouts:
        cache = TeacherCache(work / name)
        runs = [read_all(cache, args.batch_size, seed) for seed in range(args.repeats)]
        best[name] = min(runs)
    tokens = args.sequences * args.seq_len
    print(f"{args.sequences} sequences x {args.seq_len}, top-64 + 3 hidden layers (SmolLM2), batch {args.batch_size}, "
          f"units in shuffled order, best of {args.repeats}")
    print(f"{'layout':10} {'seconds':>8} {'tokens/s':>10} {'MB/s':>8}")
    for name, (seconds, nbytes) in best.items():
        print(f"{name:10} {seconds:8.3f} {tokens / seconds:10.0f} {nbytes / seconds / 1e6:8.1f}")
    print(f"sharded / unsharded time: {best['sharded'][0] / best['unsharded'][0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
