"""One cache, several students: the sweep recipe against online KD of the same students.

    python bench/sweep.py [--sequences 128] [--seq-len 128] [--steps 150]

Runs `examples/sweep.toml` (the real SmolLM2-135M-Instruct teacher once, then three students of
different sizes and methods from its cache) and prints its results table. Then trains the same three
students for the same steps on the same batches with online KD (the teacher forward in every step,
full-vocabulary KL at T=2 + 0.5 LM), and prints both total wall times and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdpipe.modelio import load_teacher, resolve_teacher
from kdpipe.pipeline.recipe import load_recipe, run_recipe, table
from kdpipe.stage2_distill.data import TrainBatches
from kdpipe.stage2_distill.losses import lm_loss
from kdpipe.stage2_distill.methods.base import Needs
from kdpipe.stage2_distill.student import build_student
from kdpipe.storage.reader import TeacherCache

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "sweep.toml"


def online_kd(teacher, student, batches, steps: int, lr: float) -> float:
    """Seconds to train `student` for `steps` with the teacher forward in each step."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    student.train()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        with torch.inference_mode():
            t_logits = teacher(input_ids=batch.input_ids, use_cache=False).logits.float()
        s_logits = student(input_ids=batch.input_ids, use_cache=False).logits.float()
        t_logp = F.log_softmax(t_logits.clone() / 2, -1)
        kd = 4 * (t_logp.exp() * (t_logp - F.log_softmax(s_logits / 2, -1))).sum(-1).mean()
        loss = kd + 0.5 * lm_loss(s_logits, batch.input_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    overrides = {"sequences": str(args.sequences), "seq_len": str(args.seq_len), "steps": str(args.steps)}
    work = Path(tempfile.mkdtemp(prefix="kdpipe-sweep-bench-"))

    start = time.perf_counter()
    results = run_recipe(str(RECIPE), overrides, workdir=str(work), echo=lambda m: None)
    sweep_seconds = time.perf_counter() - start
    print(f"kdpipe run examples/sweep.toml (SmolLM2-135M-Instruct, {args.sequences} x {args.seq_len} tokens, "
          f"{args.steps} steps per student, {torch.get_num_threads()} threads)")
    print(table(results))

    steps, variables, _ = load_recipe(str(RECIPE), overrides)
    students = [s for s in steps if s.kind == "distill"]
    cache = TeacherCache(next(r.out for r in results if r.kind == "extract"))
    teacher = load_teacher(resolve_teacher(variables["teacher"]))
    online_seconds = 0.0
    for step in students:
        batches = TrainBatches(cache, Needs(), list(range(cache.manifest.layout.num_units)), 8, seed=0)
        student = build_student(step.settings["student"], cache.manifest.teacher, seed=0).model
        seconds = online_kd(teacher, student, batches, args.steps, float(step.settings.get("lr", 5e-4)))
        batches.close()
        online_seconds += seconds
        print(f"online KD {step.name:16} {step.settings['student']:28} {seconds:7.1f} s")
    print(f"sweep from one cache (extract once + {len(students)} students): {sweep_seconds:.1f} s; "
          f"{len(students)} online-KD runs: {online_seconds:.1f} s; online / cache = "
          f"{online_seconds / sweep_seconds:.2f}")


if __name__ == "__main__":
    main()
