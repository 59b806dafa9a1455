"""Fidelity of cached-teacher distillation: how close does a student trained from a top-k (or sampled)
cache get to one trained with the teacher's full logits?

    python bench/fidelity.py [--steps 150] [--seq-len 128] [--batch-size 8]

Same student (SmolLM2-shaped, 2 layers, width 128), same seed, steps, learning rate schedule and
batches; only the KD target differs:
  (a) online KD: the teacher's full-vocabulary distribution, its forward in the loop;
  (b) exact bucket KL from the cache's top-k, for k in 8, 32, 64 (the top-8 and top-32 are the first
      entries of the stored top-64, which is sorted, so they are exact too);
  (c) the renormalized top-64 KL most tools use;
  (d) sampled logits (Anshumann et al. 2025) at equal bytes per token to the top-64 (64 slots).
Held-out perplexity on the data and the full KL(teacher || student) are computed on held-out units
with the teacher's full logits. Teacher: SmolLM2-135M-Instruct; corpus: the shipped Sonnets plus
the licence texts under /usr/share/common-licenses when the machine has them.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdpipe.modelio import load_teacher, resolve_teacher
from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.teacher import load_tokenizer
from kdpipe.stage2_distill.data import Split, TrainBatches, eval_batches
from kdpipe.stage2_distill.losses import bucket_kl, renormalized_topk_kl, sampled_cross_entropy
from kdpipe.stage2_distill.methods.base import Needs
from kdpipe.stage2_distill.student import build_student
from kdpipe.stage2_distill.trainer import DistillConfig, lr_lambda
from kdpipe.storage.reader import TeacherCache

STUDENT = "teacher:layers=2,hidden=128"


def full_kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    t = F.log_softmax(t_logits.float(), -1)
    return (t.exp() * (t - F.log_softmax(s_logits.float(), -1))).sum(-1).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-sequences", type=int, default=None)
    args = ap.parse_args()

    path = str(smollm2_gguf())
    source = resolve_teacher(path)
    teacher, tokenizer = load_teacher(source), load_tokenizer(None, source)
    data = [str(DEMO_CORPUS)] + ([str(p) for p in sorted(Path("/usr/share/common-licenses").glob("*"))
                                  if p.is_file()] if Path("/usr/share/common-licenses").is_dir() else [])
    work = Path(tempfile.mkdtemp(prefix="kdpipe-fidelity-"))
    start = time.perf_counter()
    extract(ExtractConfig(teacher=path, data=data, out=str(work / "cache"), seq_len=args.seq_len, top_k=64,
                          temperatures=[1.0], sample_count=64, max_sequences=args.max_sequences, quiet=True),
            teacher, tokenizer)
    extract_s = time.perf_counter() - start
    cache = TeacherCache(work / "cache")
    split = Split.choose(cache, 32, seed=0)
    needs = Needs(topk=True, sampled=True)
    held_out = list(eval_batches(cache, needs, split.eval_units, args.batch_size))
    with torch.inference_mode():
        held_out_teacher = [teacher(input_ids=b.input_ids, use_cache=False).logits.float() for b in held_out]

    def evaluate(student) -> tuple[float, float]:
        student.eval()
        ce = kl = 0.0
        with torch.no_grad():
            for batch, t_logits in zip(held_out, held_out_teacher):
                s_logits = student(input_ids=batch.input_ids, use_cache=False).logits.float()
                ce += F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]),
                                      batch.input_ids[:, 1:].reshape(-1)).item()
                kl += full_kl(t_logits, s_logits).item()
        student.train()
        return math.exp(ce / len(held_out)), kl / len(held_out)

    def online(s_logits, batch):
        with torch.inference_mode():
            t_logits = teacher(input_ids=batch.input_ids, use_cache=False).logits.float()
        return full_kl(t_logits.clone(), s_logits)

    def topk(k: int, renorm: bool = False):
        def loss(s_logits, batch):
            fn = renormalized_topk_kl if renorm else bucket_kl
            return fn(s_logits, batch.topk_ids[..., :k], batch.topk_logprobs[..., :k])
        return loss

    def sampled(s_logits, batch):
        return sampled_cross_entropy(s_logits, batch.sampled_ids, batch.sampled_counts)

    variants = {"(a) online full-logit KD": online, "(b) bucket KL, top-8": topk(8),
                "(b) bucket KL, top-32": topk(32), "(b) bucket KL, top-64": topk(64),
                "(c) renormalized top-64": topk(64, renorm=True), "(d) sampled, 64 slots": sampled}
    schedule = lr_lambda(DistillConfig(cache=[], student="", out="", steps=args.steps, warmup=0.1))
    results = {}
    for name, loss_fn in variants.items():
        student = build_student(STUDENT, cache.manifest.teacher, seed=0).model.train()
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        batches = TrainBatches(cache, needs, split.train_units, args.batch_size, seed=0)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            batch = next(batches)
            loss = loss_fn(student(input_ids=batch.input_ids, use_cache=False).logits, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        batches.close()
        results[name] = (*evaluate(student), time.perf_counter() - t0)
        print(f"  done {name}: ppl {results[name][0]:.2f}, KL {results[name][1]:.4f}", flush=True)

    n_params = sum(p.numel() for p in build_student(STUDENT, cache.manifest.teacher, 0).model.parameters())
    print(f"\nteacher SmolLM2-135M-Instruct; student {STUDENT} ({n_params / 1e6:.1f}M); {cache.num_sequences} "
          f"sequences x {args.seq_len} ({len(split.eval_units)} units held out); {args.steps} steps of "
          f"{args.batch_size}; lr {args.lr}; extraction {extract_s:.0f}s")
    ref_ppl, ref_kl, _ = results["(a) online full-logit KD"]
    print(f"{'run':28} {'held-out ppl':>12} {'gap':>8} {'KL(teacher||student)':>21} {'gap':>8} {'train s':>8}")
    for name, (ppl, kl, seconds) in results.items():
        print(f"{name:28} {ppl:12.2f} {100 * (ppl / ref_ppl - 1):7.2f}% {kl:21.4f} {100 * (kl / ref_kl - 1):7.2f}% "
              f"{seconds:8.0f}")
    top64, renorm, samp = (results[k][1] for k in ("(b) bucket KL, top-64", "(c) renormalized top-64",
                                                   "(d) sampled, 64 slots"))
    print(f"goal: top-64 within 1% of (a): KL gap {100 * (top64 / ref_kl - 1):.2f}%, ppl gap "
          f"{100 * (results['(b) bucket KL, top-64'][0] / ref_ppl - 1):.2f}%")
    print(f"goal: sampled closes at least half the remaining gap (renormalized top-64 -> online): "
          f"{(renorm - samp) / max(renorm - ref_kl, 1e-12):.2f} of the KL gap closed")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
