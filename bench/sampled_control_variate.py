"""Can the student's own distribution lower the draws' noise? A control variate, measured on a real student.

    python bench/sampled_control_variate.py --data '/tmp/plays/*.txt'      # ~4 min on 2 cores

`kd:estimator=sampled` trains on p^ = c / m, the count frequencies of m systematic draws. With the drawn ids'
stored log-probabilities, the student's q (known over the whole vocabulary at training time) gives a second
estimate of a known mean from the same draws, q^ = sum_i (c_i / m) (q_i / p_i) e_i with E q^ = q, and the target
t = p^ - beta (q^ - q) stays unbiased for p at any fixed beta while its noise falls where q^ tracks p^ (beta = 1:
no noise at q = p). Here a student learns online (full-logit KD, the bench's schedule and seed 0, batches of 8 x
128 from the plays); every few steps the noise of each target's gradient w.r.t. the student's logits,
E|(sum t) q - t - (q - p)|^2 per position, is measured against the exact p in float64, for beta = 0 (the counts),
1, 0.5, the batch's oracle beta* = <X, Y> / |Y|^2 (X = p^ - p, Y = q^ - q), and beta estimated from the draws
alone ((1 - <p, q>) / (sum q^2 / p - |q|^2), each term from the draws). "signal" is |q - p|^2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import full_kl, new_student, optimizer_step  # noqa: E402

from kdpipe.modelio import resolve_teacher  # noqa: E402
from kdpipe.pipeline.demo import smollm2_gguf  # noqa: E402
from kdpipe.stage1_extract.corpus import expand_sources, iter_documents, tokenize_documents  # noqa: E402
from kdpipe.stage1_extract.logits import LogitSignals, LogitSpec  # noqa: E402
from kdpipe.stage1_extract.packing import pack  # noqa: E402
from kdpipe.stage1_extract.teacher import describe_teacher, load_teacher_and_tokenizer  # noqa: E402
from kdpipe.storage.codecs import dequantize_logprobs, quantize_logprobs  # noqa: E402


def gradient_noise(p, q, ids, counts, logp, m: int) -> dict[str, float]:
    """Per-position gradient noise of each target against the exact p (all float64, [N, V])."""
    p_hat = torch.zeros_like(p).scatter_add_(-1, ids, counts / m)
    q_drawn = q.gather(-1, ids)
    ratio = torch.where(counts > 0, q_drawn / logp.exp(), torch.zeros_like(q_drawn))
    q_hat = torch.zeros_like(p).scatter_add_(-1, ids, counts / m * ratio)
    x, y = p_hat - p, q_hat - q
    oracle = float((x * y).sum() / (y * y).sum())
    cov = 1 - (counts / m * q_drawn).sum(-1)  # 1 - <p, q>, from the draws
    var = (counts / m * ratio * ratio).sum(-1) - (q * q).sum(-1)  # sum q^2 / p - |q|^2, from the draws
    estimated = float((cov.sum() / var.sum()).clamp(0, 1))
    out = {}
    for name, beta in (("counts", 0.0), ("beta=1", 1.0), ("beta=0.5", 0.5), ("oracle", oracle),
                       ("estimated", estimated)):
        t = p_hat - beta * y
        noise = t.sum(-1, keepdim=True) * q - t - (q - p)
        out[name] = float((noise ** 2).sum(-1).mean())
    return {**out, "signal": float(((q - p) ** 2).sum(-1).mean()), "oracle beta": oracle,
            "estimated beta": estimated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--steps", type=int, default=51)
    ap.add_argument("--sample-count", type=int, default=12)
    args = ap.parse_args()
    m = args.sample_count
    source = resolve_teacher(str(smollm2_gguf()))
    teacher, tokenizer = load_teacher_and_tokenizer(source)
    blocks, _ = pack(tokenize_documents(iter_documents(expand_sources(args.data)), tokenizer), 128,
                     tokenizer.eos_token_id, "packed", tokenizer.eos_token_id, max_sequences=64 + 8 * args.steps)
    rows = np.asarray(blocks[0:len(blocks)])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[64:]
    student, opt, sched = new_student(describe_teacher(teacher, "SmolLM2", "float32"),
                                      argparse.Namespace(lr=2e-3, steps=300), 0)  # the one-pass bench's 300 steps
    start = time.time()
    for step in range(args.steps):
        index = order[step * 8:(step + 1) * 8]
        input_ids = torch.from_numpy(rows[index.numpy()]).long()
        with torch.no_grad():
            t_logits = teacher(input_ids=input_ids, use_cache=False).logits.float()
        logits = student(input_ids=input_ids, use_cache=False).logits
        if step % 25 == 0 or step in (5, 10):
            with torch.no_grad():
                spec = LogitSpec(top_k=1, temperatures=[1.0], vocab_size=t_logits.shape[-1], sample_count=m,
                                 sampler="systematic", seed=0)
                drawn = LogitSignals(spec)
                drawn.compute(t_logits.clone(), lambda h: h, index.tolist())
                logp = torch.from_numpy(dequantize_logprobs(quantize_logprobs(drawn.sampled_logprobs.numpy())))
                res = gradient_noise(t_logits.double().softmax(-1), logits.detach().double().softmax(-1),
                                     drawn.sampled_ids, drawn.sampled_counts.double(), logp.double(), m)
            print(f"step {step} ({time.time() - start:.0f}s): " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()),
                  flush=True)
        optimizer_step(full_kl(t_logits.clone(), logits), student, opt, sched)


if __name__ == "__main__":
    main()
