"""How fast a student run can read the teacher cache: unsharded (one chunk per work unit, the default)
against sharded (small chunks inside one shard per unit), same data, side by side; and what the reader's
integrity checks cost (every chunk a read covers must exist: zarr would read a missing one as zeros)
against bare zarr reads of the same arrays.

    python bench/read_speed.py [--sequences 64] [--seq-len 256] [--batch-size 8] [--repeats 3]

Extracts the same SmolLM2 cache twice (top-64 logits, 3 hidden layers), then reads every sequence in
batches, units in shuffled order, as a training loop would; prints seconds, tokens/s, MB/s decoded,
the sharded/unsharded ratio and the checked/bare ratio.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer, resolve_teacher
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.schema import hidden_name


def read_all(cache: TeacherCache, batch: int, seed: int, checked: bool = True) -> tuple[float, int]:
    per = cache.manifest.layout.sequences_per_unit
    units = list(range(cache.manifest.layout.num_units))
    random.Random(seed).shuffle(units)
    names = ["logits/topk_ids", "logits/topk_values", "logits/logsumexp"] + \
        [hidden_name(layer) for layer in cache.manifest.signals.hidden_layers]
    nbytes = 0
    start = time.perf_counter()
    for unit in units:
        for b0 in range(unit * per, min((unit + 1) * per, cache.num_sequences), batch):
            index = slice(b0, min(b0 + batch, (unit + 1) * per, cache.num_sequences))
            if checked:  # the product's reader: chunk presence checked, damage named
                arrays = list(cache.topk_logprobs(index)) + [cache.hidden(layer, index)
                                                             for layer in cache.manifest.signals.hidden_layers]
            else:  # bare zarr reads with the reader's same conversions: what it did before it checked
                ids, values, lse, *hidden = [np.asarray(cache.array(name)[index]) for name in names]
                arrays = [ids.astype(np.int64), values.astype(np.float32), lse] + [h.astype(np.float32) for h in hidden]
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
    model, tokenizer = load_teacher_and_tokenizer(source)
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
        for checked in (False, True):  # interleaved, so both see the same page cache
            label = name + ("" if checked else " bare")
            runs = [read_all(cache, args.batch_size, seed, checked) for seed in range(args.repeats)]
            best[label] = min(runs)
    tokens = args.sequences * args.seq_len
    print(f"{args.sequences} sequences x {args.seq_len}, top-64 + 3 hidden layers (SmolLM2), batch {args.batch_size}, "
          f"units in shuffled order, best of {args.repeats}")
    print(f"{'layout':15} {'seconds':>8} {'tokens/s':>10} {'MB/s':>8}")
    for name, (seconds, nbytes) in best.items():
        print(f"{name:15} {seconds:8.3f} {tokens / seconds:10.0f} {nbytes / seconds / 1e6:8.1f}")
    print(f"sharded / unsharded time: {best['sharded'][0] / best['unsharded'][0]:.2f}")
    for name in layouts:
        print(f"{name}: checked reader / bare zarr time: {best[name][0] / best[name + ' bare'][0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
