"""`kdpipe distill`: train a student from the teacher cache alone.

AdamW, linear warmup then cosine decay, gradient accumulation, clipping, bf16 autocast where the device
has it, optional DeepSpeed ZeRO for the student, checkpoints and exact resume, held-out evaluation,
metrics as JSONL, and the student saved with `save_pretrained`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from kdpipe.capture import Capture, text_config
from kdpipe.console import quiet_libraries, say
from kdpipe.distributed import distributed_env
from kdpipe.errors import UserError
from kdpipe.stage2_distill import checkpoint
from kdpipe.stage2_distill.data import (Split, TrainBatches, check_teachers, eval_batches, hidden_scales, merge_needs,
                                        open_caches)
from kdpipe.stage2_distill.evaluate import eval_needs, evaluate
from kdpipe.stage2_distill.methods import Context, StudentOutput
from kdpipe.modelio import check_device
from kdpipe.stage2_distill.layermap import check_layer_map
from kdpipe.stage2_distill.methods.base import build_methods, validate_specs
from kdpipe.stage2_distill.rundir import RunDir
from kdpipe.stage2_distill.student import build_student, save_student
from kdpipe.stage2_distill.trackers import Trackers, cache_summary, check_trackers


@dataclass
class DistillConfig:
    cache: list[str]
    student: str
    out: str
    method: list[str] = field(default_factory=lambda: ["kd"])
    init_from_teacher: str | None = None
    layer_map: str = "uniform"
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of steps (< 1) or a number of steps
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    eval_sequences: int | None = None  # None: a share of the units (see data.Split), capped at 64 sequences
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    overwrite: bool = False
    deepspeed: str | None = None
    device: str = "cpu"
    precision: str = "auto"  # auto | fp32 | bf16
    allow_partial: bool = False
    buffer_units: int = 4
    trust_remote_code: bool = False
    quiet: bool = False
    report_to: list[str] = field(default_factory=list)  # tensorboard, mlflow, wandb (trackers.py)


@dataclass
class DistillResult:
    out: str
    steps: int
    final: dict[str, float]
    initial: dict[str, float]
    seconds: float
    tokens_per_second: float
    already_finished: bool = False  # resumed a run that had finished: nothing was trained


def check_config(cfg: DistillConfig) -> None:
    """Every flag a user can get wrong, before anything is read or loaded."""
    checks = [
        (bool(cfg.cache), "no --cache given: pass the teacher cache to learn from"),
        (cfg.steps > 0 and cfg.batch_size > 0 and cfg.grad_accum > 0,
         "--steps, --batch-size and --grad-accum must be positive"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number (got {cfg.lr:g})"),
        (cfg.weight_decay >= 0, "--weight-decay must be 0 or more"),
        (cfg.warmup >= 0, "--warmup must be 0 or more (a fraction of --steps below 1, or a step count)"),
        (0 <= cfg.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
        (cfg.clip > 0, "--clip must be positive"),
        (cfg.eval_every >= 0 and cfg.save_every >= 0, "--eval-every and --save-every must be 0 or more"),
        (cfg.eval_sequences is None or cfg.eval_sequences >= 0, "--eval-sequences must be 0 or more"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other: pick one"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_device(cfg.device)
    validate_specs(cfg.method)
    if cfg.layer_map != "uniform" and not cfg.init_from_teacher:
        raise UserError("--layer-map chooses the teacher layers --init-from-teacher copies; a method takes its own "
                        "(e.g. --method tinybert:layer_map=skip)")
    check_layer_map(cfg.layer_map)
    cfg.report_to = check_trackers(cfg.report_to)


def lr_lambda(cfg: DistillConfig):
    warmup = int(cfg.warmup * cfg.steps) if cfg.warmup < 1 else int(cfg.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _autocast(cfg: DistillConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def student_runner(model, padded: bool):
    """A forward of the student with some hidden states edited, keeping the graph (StudentOutput.run)."""
    def run(input_ids, mask, edits, hidden_layers=()):
        with Capture(model, hidden_layers, edits=edits, detach=False) as cap:
            logits = model(input_ids=input_ids, attention_mask=mask.long() if padded else None, use_cache=False).logits
        return logits, dict(cap.hidden)
    return run


def distill(cfg: DistillConfig) -> DistillResult:
    check_config(cfg)
    if cfg.quiet:
        quiet_libraries()
    rank, world = distributed_env()
    run = RunDir(cfg.out, cfg.resume, cfg.overwrite, rank)  # refuses a run it must not touch, before any loading
    caches = open_caches(cfg.cache, cfg.allow_partial)
    with run:  # one writer per run directory (rank 0 holds the lock)
        finished = run.finished(cfg.steps) if cfg.resume else None
        if finished is not None:  # finished is a state, not an error: nothing is retrained or rewritten
            return DistillResult(str(run.path), cfg.steps, finished["final"], finished["initial"], 0.0, 0.0, True)
        return _train(cfg, run, caches, rank, world)


def _train(cfg: DistillConfig, run: RunDir, caches, rank: int, world: int) -> DistillResult:
    cache, m = caches[0], caches[0].manifest
    device = torch.device(cfg.device)
    student = build_student(cfg.student, m.teacher, cfg.seed, cfg.init_from_teacher, cfg.layer_map,
                            cfg.trust_remote_code)
    model = student.model.to(device)
    scfg = text_config(model)
    ctx = Context(teacher=m.teacher, temperatures=m.signals.temperatures, student_layers=scfg.num_hidden_layers,
                  student_hidden=scfg.hidden_size, total_steps=cfg.steps, student_pretrained=student.pretrained,
                  teacher_attention_scaling=m.signals.attention_scaling, cached_hidden=list(m.signals.hidden_layers),
                  teacher_windows={x: m.window(x) for x in m.signals.attention_layers},
                  teacher_attention_softcap=m.signals.attention_softcap,
                  teachers=[c.manifest.teacher for c in caches],
                  teacher_hidden=[list(c.manifest.signals.hidden_layers) for c in caches],
                  teacher_temperatures=[list(c.manifest.signals.temperatures) for c in caches],
                  teacher_sample_temperatures=[c.manifest.signals.sample_temperature for c in caches])
    methods = build_methods(cfg.method, ctx)
    check_teachers(caches, methods, model.get_output_embeddings().weight.shape[0])
    for method in methods:
        method.to(device)
    split = Split.choose(cache, cfg.eval_sequences, cfg.seed, warn=say)
    needs = merge_needs([mt.needs() for mt in methods] + ([eval_needs(cache)] if split.eval_units else []))
    other_needs = [(c, merge_needs([mt.teacher_needs(i) for mt in methods])) for i, c in enumerate(caches) if i]
    # each hidden layer's channel scale, from the training sequences (never the held-out ones)
    ctx.hidden_scales = [hidden_scales(c, merge_needs([mt.teacher_needs(i) for mt in methods]).hidden, split.train_units)
                         for i, c in enumerate(caches)]
    for scales in ctx.hidden_scales:
        for layer, scale in scales.items():
            scales[layer] = scale.to(device)
    student_layers = sorted({layer for mt in methods for layer in mt.student_layers()})
    student_blocks = sorted({layer for mt in methods for layer in mt.student_attention_layers()})
    if world > 1 and len(split.train_units) < world:
        raise UserError(f"{len(split.train_units)} training units cannot be split over {world} ranks: extract with "
                        f"a smaller --sequences-per-unit")
    params = [p for p in model.parameters()] + [p for mt in methods for p in mt.parameters()]
    engine = None
    if cfg.deepspeed:
        from kdpipe.stage2_distill.zero import wrap_student

        engine, optimizer = wrap_student(model, methods, cfg.lr, cfg.weight_decay, cfg.deepspeed, cfg.batch_size,
                                         cfg.grad_accum, cfg.clip, cfg.device)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    ckpt_dir = run.path / "checkpoints"
    state = checkpoint.restore_training(ckpt_dir, model, methods, optimizer, scheduler, engine) if cfg.resume else None
    start = state["step"] if state else 0
    if state and state.get("split") != asdict(split):
        raise UserError(f"the checkpoint in {ckpt_dir} was trained on another train/eval split: resume with the "
                        f"run's own --seed, --eval-sequences and cache")
    previous = run.previous() or {}
    if cfg.resume and previous.get("cache_fingerprint") not in (None, m.data.fingerprint):
        raise UserError(f"{run.path} was trained on a cache of other token ids: resume it with its own --cache")
    history = run.keep_metrics_until(start if start else -1)  # steps after it are redone, not logged twice
    run.write_run({"config": asdict(cfg), "split": asdict(split), "student": student.description,
                   "methods": [mt.describe() for mt in methods], "cache_fingerprint": m.data.fingerprint})

    padded = m.data.packing == "padded"
    run_student = student_runner(model, padded)
    evaluate_now = lambda: evaluate(model, eval_batches(cache, needs, split.eval_units, cfg.batch_size), device, padded)  # noqa: E731
    evals = [r for r in history if "eval/ce" in r]
    initial = next((strip_step(r) for r in evals if r["step"] == 0), {})
    final = strip_step(evals[-1]) if evals else {}
    metrics = open(run.metrics_file, "a")
    trackers = Trackers(cfg.report_to, run.path, asdict(cfg), cache_summary(m)) if cfg.report_to and rank == 0 \
        else None
    if split.eval_units and start == 0:
        initial = final = evaluate_now()
        metrics.write(json.dumps({"step": 0, **initial}) + "\n")
        if trackers:
            trackers.log({"step": 0, **initial})
    batches = TrainBatches(cache, needs, split.train_units[rank::world], cfg.batch_size, cfg.seed, cfg.buffer_units,
                           skip=start * cfg.grad_accum, others=other_needs,  # each rank reads its own units
                           least_signal_rows=max([mt.batch_rows for mt in methods if mt.reads_layers(len(caches))],
                                                 default=1))
    bar = tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", disable=cfg.quiet, dynamic_ncols=True)
    tokens = 0
    starts: list[dict[str, float]] = []  # the first steps' loss terms, to say if one swamps the others
    uncompared = {term for mt in methods for term in mt.uncompared}
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            model.train()
            terms_sum: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                batch = next(batches).to(device)
                with _autocast(cfg, device), Capture(model, student_layers, student_blocks, "factors",
                                                     detach=False) as cap:
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.mask.long() if padded else None,
                                   use_cache=False).logits
                    outputs = StudentOutput(logits=logits, hidden=dict(cap.hidden), factors=dict(cap.attention),
                                            scaling=cap.scaling, masks=dict(cap.masks), softcaps=dict(cap.softcaps),
                                            run=run_student)
                    terms = {f"{mt.name}/{k}": mt.weight * v for mt in methods
                             for k, v in method_loss(mt, batch, outputs, step, len(caches)).items()}
                    loss = sum(terms.values())
                if engine is not None:  # DeepSpeed scales by 1 / grad_accum and steps at the boundary itself
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / cfg.grad_accum).backward()
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / cfg.grad_accum
                tokens += int(batch.mask.sum())
            if engine is None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
            scheduler.step()
            elapsed = time.perf_counter() - t0
            record = {"step": step + 1, "loss": sum(terms_sum.values()), **terms_sum, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm, "tokens_per_s": tokens / max(elapsed, 1e-9)}
            if split.eval_units and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
                final = evaluate_now()
                record.update(final)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if trackers:
                trackers.log(record)
            starts.append({k: v for k, v in terms_sum.items() if k.split("/", 1)[1] not in uncompared})
            if len(starts) == DOMINANCE_STEPS and rank == 0:
                warn_dominance(starts, say)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in terms_sum.items()} |
                            {"tok/s": f"{record['tokens_per_s']:.0f}"})
            bar.update(1)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                checkpoint.save_training(ckpt_dir, step + 1, model, methods, optimizer, scheduler, engine,
                                         {"split": asdict(split)})
        if split.eval_units and start == cfg.steps and not (evals and evals[-1]["step"] == cfg.steps):
            final = evaluate_now()  # stopped between the last checkpoint and its evaluation
    finally:
        bar.close()
        batches.close()
        metrics.close()
        if trackers:
            trackers.close()
    seconds = time.perf_counter() - t0
    save_student(model, engine, run.path / "student", cache if rank == 0 else None)
    if rank == 0:
        run.write_final({"steps": cfg.steps, "initial": initial, "final": final})
    return DistillResult(str(run.path), cfg.steps, final, initial, seconds, tokens / max(seconds, 1e-9))


def method_loss(method, batch, outputs: StudentOutput, step: int, caches: int) -> dict[str, torch.Tensor]:
    """A method's loss terms. From a subsampled cache an intermediate-layer method sees the rows that carry
    hidden states and attention (every batch holds some: data.plan), so its loss averages over them; from a
    position-subsampled one, the student's states at the positions the teacher's are stored for (their
    `layer_mask` the tokens among them), while logits stay whole."""
    if method.reads_layers(caches) and (batch.signal_rows is not None or batch.signal_positions is not None):
        return method.loss(batch.signal_view(), outputs.rows(batch.signal_rows).at(batch.signal_positions), step)
    return method.loss(batch, outputs, step)


DOMINANCE_STEPS = 10  # steps whose mean loss terms are compared
DOMINANCE = 1000.0  # a term this many times another one leaves that one no say in the gradient


def warn_dominance(records: list[dict[str, float]], say) -> None:
    """One line when a loss term is orders of magnitude above another over the first steps."""
    means = {k: sum(abs(r[k]) for r in records) / len(records) for k in records[0]}
    live = {k: v for k, v in means.items() if v > 0}
    if len(live) < 2:
        return
    big, small = max(live, key=live.get), min(live, key=live.get)
    if live[big] >= DOMINANCE * live[small]:
        say(f"loss term {big} ({live[big]:.3g}) is {live[big] / live[small]:.0f}x {small} ({live[small]:.3g}) over "
            f"the first {len(records)} steps: {small} barely moves the student; lower {big.split('/')[0]}'s weight "
            f"(--method {big.split('/')[0]}:weight=...) or its alpha")


def strip_step(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("eval/")}
