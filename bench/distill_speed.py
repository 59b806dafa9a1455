"""Stage 2 speed: a student step from the cache against plain student training and online KD.

    python bench/distill_speed.py [--sequences 64] [--seq-len 256] [--batch-size 8] [--steps 12]

On the real SmolLM2-135M-Instruct teacher and a ~15M student of its shape (4 layers, hidden 256), with
the same batches, prints the time per optimizer step of (a) plain LM training of the student (a bare
PyTorch loop), (b) `kdpipe distill` from the cache with KD (the product's trainer, reading top-64
log-probabilities and logsumexp from the cache), (c) online KD with the teacher forward in the loop
(full-vocabulary KL), and the ratios b/a (goal <= 1.15) and c/b (goal >= 3).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdpipe.modelio import resolve_teacher
from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer
from kdpipe.stage2_distill.data import TrainBatches
from kdpipe.stage2_distill.losses import lm_loss
from kdpipe.stage2_distill.methods.base import Needs
from kdpipe.stage2_distill.student import build_student
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from kdpipe.storage.reader import TeacherCache

STUDENT = "teacher:layers=4,hidden=256"


def timed_loop(student, batches, steps: int, warmup: int, step_fn) -> float:
    """Seconds per optimizer step after `warmup` steps, same AdamW settings as the trainer."""
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.01)
    student.train()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        batch = next(batches)
        loss = step_fn(student, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    teacher_path = str(smollm2_gguf())
    source = resolve_teacher(teacher_path)
    teacher, tokenizer = load_teacher_and_tokenizer(source)
    work = Path(tempfile.mkdtemp(prefix="kdpipe-distill-bench-"))
    cache_path = work / "cache"
    extract(ExtractConfig(teacher=teacher_path, data=[str(DEMO_CORPUS)], out=str(cache_path), seq_len=args.seq_len,
                          top_k=64, temperatures=[1.0], max_sequences=args.sequences, quiet=True), teacher, tokenizer)
    cache = TeacherCache(cache_path)
    units = list(range(cache.manifest.layout.num_units))

    def batches(needs: Needs):
        return TrainBatches(cache, needs, units, args.batch_size, seed=0)

    def fresh_student():
        return build_student(STUDENT, cache.manifest.teacher, seed=0).model

    n_params = sum(p.numel() for p in fresh_student().parameters())

    def lm_step(student, batch):
        return lm_loss(student(input_ids=batch.input_ids, use_cache=False).logits, batch.input_ids)

    def online_kd_step(student, batch):
        with torch.inference_mode():
            t_logits = teacher(input_ids=batch.input_ids, use_cache=False).logits.float()
        s_logp = F.log_softmax(student(input_ids=batch.input_ids, use_cache=False).logits.float(), -1)
        t_logp = F.log_softmax(t_logits.clone(), -1)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()

    total = args.warmup + args.steps
    plain = timed_loop(fresh_student(), batches(Needs()), args.steps, args.warmup, lm_step)

    def trainer_step_time(method: str) -> float:
        out = work / f"run-{method}"
        cfg = DistillConfig(cache=[str(cache_path)], student=STUDENT, out=str(out), method=[method], steps=total,
                            batch_size=args.batch_size, eval_sequences=0, quiet=True)
        distill(cfg)
        import json
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tokens = args.batch_size * args.seq_len
        # tokens_per_s is cumulative: seconds at step s = s * tokens / tokens_per_s
        t_at = [x["step"] * tokens / x["tokens_per_s"] for x in lines]
        return (t_at[total - 1] - t_at[args.warmup - 1]) / args.steps

    cache_kd = trainer_step_time("kd")
    cache_lm = trainer_step_time("lm")
    online = timed_loop(fresh_student(), batches(Needs()), args.steps, args.warmup, online_kd_step)

    print(f"teacher SmolLM2-135M-Instruct, student {STUDENT} ({n_params / 1e6:.1f}M parameters), batch "
          f"{args.batch_size} x {args.seq_len}, {torch.get_num_threads()} threads, {args.steps} timed steps after "
          f"{args.warmup} warm-up")
    print(f"{'run':44} {'s/step':>8}")
    for name, t in [("(a) plain LM, bare PyTorch loop", plain), ("    plain LM, kdpipe distill --method lm", cache_lm),
                    ("(b) kdpipe distill --method kd (from cache)", cache_kd),
                    ("(c) online KD, teacher forward each step", online)]:
        print(f"{name:44} {t:8.3f}")
    print(f"b/a = {cache_kd / plain:.3f} (goal <= 1.15); c/b = {online / cache_kd:.2f} (goal >= 3)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
