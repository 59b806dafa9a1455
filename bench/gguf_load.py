"""Loading a GGUF teacher: its metadata parsed once (`modelio.gguf_parsed_once`) against once per load.

    python bench/gguf_load.py [--teacher smollm2|gemma3-270m|PATH.gguf] [--repeats 2]

`kdpipe extract --teacher x.gguf` reads the teacher's config (to check the settings before anything heavy
loads), its tokenizer and its weights; transformers parses the GGUF file's metadata, the whole vocabulary
included, for each. Prints, alternating the two ways so that the machine's drift falls on both, seconds of
config + tokenizer + weights per way (best of --repeats) and the ratio, and checks that both load the same
tokenizer and weights.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from kdpipe import modelio
from kdpipe.stage1_extract.teacher import load_tokenizer
from kdpipe.storage.fingerprint import tokenizer_fingerprint


def load_all(source, shared: bool):
    modelio._CONFIGS.clear()  # the config is read from the file each time, as a new process reads it
    start = time.perf_counter()
    with modelio.gguf_parsed_once() if shared else nullcontext():
        modelio.load_config(source)
        tokenizer = load_tokenizer(None, source)
        model = modelio.load_teacher(source)
    return time.perf_counter() - start, tokenizer, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    source = modelio.resolve_teacher(args.teacher)
    seconds = {False: [], True: []}
    loaded = {}
    for _ in range(args.repeats):
        for shared in (False, True):
            took, tokenizer, model = load_all(source, shared)
            seconds[shared].append(took)
            loaded[shared] = (tokenizer_fingerprint(tokenizer), model.state_dict())
            del model
    same_tokenizer = loaded[False][0] == loaded[True][0]
    same_weights = all(torch.equal(a, b) for a, b in zip(loaded[False][1].values(), loaded[True][1].values()))
    apart, once = min(seconds[False]), min(seconds[True])
    print(f"{source.name}: config + tokenizer + weights, best of {args.repeats}")
    print(f"  metadata parsed per load: {apart:6.1f} s  ({', '.join(f'{s:.1f}' for s in seconds[False])})")
    print(f"  parsed once:              {once:6.1f} s  ({', '.join(f'{s:.1f}' for s in seconds[True])})")
    print(f"  ratio {apart / once:.2f}x; same tokenizer {same_tokenizer}, same weights {same_weights}")


if __name__ == "__main__":
    main()
