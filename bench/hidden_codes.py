"""How much of a real decoder's hidden states the int8 code and its projections keep, on held-out tokens.

    python bench/hidden_codes.py --data paradiselost.txt [--seq-len 128] [--calibration 32] [--held-out 16]

SmolLM2-135M-Instruct's hidden states of layers 0, 15 and 30 over the first sequences of the text: the code
(storage.signal_codec) is fitted on `--calibration` sequences and measured on the next `--held-out`, as the
relative squared error in the channel-scaled space (what `signals.hidden_error` records at extraction), at
every channel and at projections to 1/16 .. 1/2 of the width; and, for contrast, int8 with one scale per raw
vector (what massive activations break).
"""

from __future__ import annotations

import argparse

import torch

from kdpipe.pipeline.demo import smollm2_gguf
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer, resolve_teacher
from kdpipe.storage.signal_codec import HiddenCodec, dequantize, quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=16)
    args = ap.parse_args()
    source = resolve_teacher(str(smollm2_gguf()))
    model, tokenizer = load_teacher_and_tokenizer(source)
    n, t = args.calibration + args.held_out, args.seq_len
    ids = tokenizer(open(args.data, encoding="utf-8").read())["input_ids"][: n * t]
    with torch.inference_mode():
        states = model(input_ids=torch.tensor(ids).view(n, t), output_hidden_states=True).hidden_states
    width = model.config.hidden_size
    ranks = (0, width // 2, width // 4, width // 8, width // 16)  # 0: every channel
    print(f"SmolLM2-135M, {args.calibration} x {t} calibration tokens, {args.held_out} x {t} held out; relative "
          f"squared error on the held-out tokens, channel-scaled")
    print(f"{'layer':>5} {'max |h|':>9} {'per raw vector':>15} " + " ".join(
        f"{'rank ' + str(r or width):>10}" for r in ranks))
    for layer in (0, 15, 30):
        h = states[layer].reshape(-1, width)
        calib, held = h[: args.calibration * t], h[args.calibration * t:]
        codes = {rank: HiddenCodec.fit(calib, rank)[0] for rank in ranks}
        cells = [f"{codes[rank].relative_error(held):10.4f}" for rank in ranks]
        code = codes[0]
        y = (held - code.center) / code.scale
        naive = (dequantize(*quantize(held)) - code.center) / code.scale
        raw = float((naive - y).pow(2).sum() / y.pow(2).sum())
        print(f"{layer:>5} {float(h.abs().max()):9.1f} {raw:15.4f} " + " ".join(cells))


if __name__ == "__main__":
    main()
