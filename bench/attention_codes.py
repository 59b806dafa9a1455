"""How much of a real decoder's attention the int8 Q/K/V codes and their per-head projections keep, held out.

    python bench/attention_codes.py [--data FILE] [--seq-len 64] [--calibration 64] [--held-out 32]

SmolLM2-135M-Instruct's post-RoPE Q/K/V of blocks 15 and 30 (9 query heads, 3 KV heads, 64 dimensions) over
the first sequences of the text (default: the shipped Sonnets). Each code (storage.signal_codec) is fitted on
`--calibration` sequences and measured on the next `--held-out`: int8 of every dimension, and FactorCodec at
ranks 32, 24, 16 and 8 with plain principal directions (each of Q, K, V its own) and with the score-aware
directions `--attention-rank` uses (Q and K in each other's second moments; V its own). Printed per block: the
relative squared error of Q, K, V and of the causal scores q.k, the KL of the attention rows rebuilt from the
coded factors against the exact ones, and the bytes per token of the block's factors.
"""

from __future__ import annotations

import argparse

import torch

from kdpipe.capture import Capture
from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer, resolve_teacher
from kdpipe.storage.attention import attention_scores, key_mask, probs_from_scores
from kdpipe.storage.signal_codec import FactorCodec, dequantize, quantize, score_metrics

BLOCKS = (15, 30)


def vectors(x: torch.Tensor) -> torch.Tensor:
    """[B, h, T, d] -> every token's vectors [B*T, h, d] (what FactorCodec.fit takes)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEMO_CORPUS))
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=32)
    args = ap.parse_args()
    source = resolve_teacher(str(smollm2_gguf()))
    model, tokenizer = load_teacher_and_tokenizer(source)
    n, t, c = args.calibration + args.held_out, args.seq_len, args.calibration
    ids = tokenizer(open(args.data, encoding="utf-8").read())["input_ids"][: n * t]
    with torch.inference_mode(), Capture(model, attention_layers=list(BLOCKS), attention_form="factors") as cap:
        model(input_ids=torch.tensor(ids).view(n, t))
        factors = {b: tuple(x.float() for x in cap.attention[b]) for b in BLOCKS}
        scaling = cap.scaling
    mask = key_mask(t, t, True, None)
    print(f"SmolLM2-135M, {c} x {t} calibration tokens, {args.held_out} x {t} held out; relative squared errors and "
          f"the attention rows' KL on the held-out tokens")
    for block in BLOCKS:
        q, k, v = factors[block]
        held = tuple(x[c:] for x in (q, k, v))
        calib = tuple(vectors(x[:c]) for x in (q, k, v))
        metric_q, metric_k = score_metrics(calib[0], calib[1])
        scores = attention_scores(held[0], held[1], scaling)
        exact = probs_from_scores(scores, mask)
        heads = q.shape[1] + 2 * k.shape[1]
        print(f"block {block}: q {tuple(q.shape[1:])}, k/v {tuple(k.shape[1:])}, |q| max {q.abs().max():.1f}, "
              f"|k| max {k.abs().max():.1f}")
        print(f"{'code':>18} {'q':>8} {'k':>8} {'v':>8} {'scores':>8} {'attn KL':>8} {'B/token':>8}")
        runs = [("int8, every dim", None, None)] + [
            (f"rank {r} {kind}", r, kind) for r in (32, 24, 16, 8) for kind in ("plain", "scores")]
        for name, rank, kind in runs:
            if rank is None:
                coded = tuple(dequantize(*quantize(x)) for x in held)
            else:
                metrics = (metric_q, metric_k, None) if kind == "scores" else (None, None, None)
                codes = [FactorCodec.fit(x, rank, w) for x, w in zip(calib, metrics)]
                coded = tuple(code.decode(*code.encode(x)) for code, x in zip(codes, held))
            s = attention_scores(coded[0], coded[1], scaling)
            p = probs_from_scores(s, mask)
            kl = float((exact * (exact.clamp_min(1e-30).log() - p.clamp_min(1e-30).log())).sum(-1).mean())
            causal = mask.expand_as(s)
            errors = [relative(a, b) for a, b in zip(coded, held)] + [relative(s[causal], scores[causal])]
            width = rank or q.shape[-1]
            print(f"{name:>18} " + " ".join(f"{e:8.4f}" for e in errors) + f" {kl:8.4f} {heads * (width + 2):8d}")


if __name__ == "__main__":
    main()
