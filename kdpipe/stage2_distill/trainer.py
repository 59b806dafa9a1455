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
from pathlib import Path

import torch
from tqdm import tqdm

from kdpipe.capture import Capture, text_config
from kdpipe.distributed import distributed_env
from kdpipe.errors import UserError
from kdpipe.stage2_distill import checkpoint
from kdpipe.stage2_distill.data import Split, TrainBatches, eval_batches, merge_needs
from kdpipe.stage2_distill.evaluate import evaluate
from kdpipe.stage2_distill.methods import Context, StudentOutput
from kdpipe.stage2_distill.methods.base import Needs, build_methods, check_needs
from kdpipe.stage2_distill.student import build_student
from kdpipe.storage.reader import TeacherCache


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
    eval_sequences: int = 64
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    deepspeed: str | None = None
    device: str = "cpu"
    precision: str = "auto"  # auto | fp32 | bf16
    allow_partial: bool = False
    buffer_units: int = 4
    trust_remote_code: bool = False
    quiet: bool = False


@dataclass
class DistillResult:
    out: str
    steps: int
    final: dict[str, float]
    initial: dict[str, float]
    seconds: float
    tokens_per_second: float


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


def open_caches(paths: list[str], allow_partial: bool) -> list[TeacherCache]:
    """The caches of one run: every teacher over the same token ids (one data fingerprint). Units come
    from the first; the others must be complete."""
    caches = [TeacherCache(p, allow_partial=allow_partial and i == 0) for i, p in enumerate(paths)]
    first = caches[0]
    for other in caches[1:]:
        a, b = first.manifest.data.fingerprint, other.manifest.data.fingerprint
        if a != b:
            raise UserError(f"caches {first.path} (data fingerprint {a[:16]}) and {other.path} ({b[:16]}) hold "
                            f"different token ids: extract every teacher over the same --data, --seq-len and "
                            f"--packing with the same tokenizer")
    return caches


def check_teachers(caches: list[TeacherCache], methods) -> None:
    """Every method's needs against every cache; logits across teachers need one vocabulary."""
    if len(caches) > 1 and not any(mt.teacher_needs(i) != Needs() for mt in methods for i in range(1, len(caches))):
        raise UserError(f"{len(caches)} caches given but no chosen method reads more than one teacher: add a "
                        f"multi-teacher method (tmkd, mt_bert, rl_kd, uncertainty, dgkd) or pass one --cache")
    first = caches[0].manifest
    for i, cache in enumerate(caches):
        check_needs(methods, cache.manifest, cache.path, i)
        reads_logits = any(mt.teacher_needs(i).topk or mt.teacher_needs(i).sampled for mt in methods)
        if i and reads_logits and cache.manifest.tokenizer.vocab_sha256 != first.tokenizer.vocab_sha256:
            raise UserError(f"{cache.path} and {caches[0].path} come from teachers with different vocabularies: "
                            f"logit methods across teachers need one tokenizer")


def student_runner(model, padded: bool):
    """A forward of the student with some hidden states edited, keeping the graph (StudentOutput.run)."""
    def run(input_ids, mask, edits, hidden_layers=()):
        with Capture(model, hidden_layers, edits=edits, detach=False) as cap:
            logits = model(input_ids=input_ids, attention_mask=mask.long() if padded else None, use_cache=False).logits
        return logits, dict(cap.hidden)
    return run


def distill(cfg: DistillConfig) -> DistillResult:
    if not cfg.cache:
        raise UserError("no --cache given: pass the teacher cache to learn from")
    if cfg.steps <= 0 or cfg.batch_size <= 0 or cfg.grad_accum <= 0:
        raise UserError("--steps, --batch-size and --grad-accum must be positive")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    caches = open_caches(cfg.cache, cfg.allow_partial)
    cache, m = caches[0], caches[0].manifest
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    device = torch.device(cfg.device)

    student = build_student(cfg.student, m.teacher, cfg.seed, cfg.init_from_teacher, cfg.layer_map,
                            cfg.trust_remote_code)
    model = student.model.to(device)
    scfg = text_config(model)
    ctx = Context(teacher=m.teacher, temperatures=m.signals.temperatures, student_layers=scfg.num_hidden_layers,
                  student_hidden=scfg.hidden_size, total_steps=cfg.steps, student_pretrained=student.pretrained,
                  teacher_attention_scaling=m.signals.attention_scaling, cached_hidden=list(m.signals.hidden_layers),
                  teachers=[c.manifest.teacher for c in caches],
                  teacher_hidden=[list(c.manifest.signals.hidden_layers) for c in caches],
                  teacher_temperatures=[list(c.manifest.signals.temperatures) for c in caches])
    methods = build_methods(cfg.method, ctx)
    check_teachers(caches, methods)
    for method in methods:
        method.to(device)
    split = Split.choose(cache, cfg.eval_sequences, cfg.seed)
    needs = merge_needs([mt.needs() for mt in methods] + [Needs(topk=bool(split.eval_units))])  # eval reads top-k
    other_needs = [(c, merge_needs([mt.teacher_needs(i) for mt in methods])) for i, c in enumerate(caches) if i]
    student_layers = sorted({layer for mt in methods for layer in mt.student_layers()})
    student_blocks = sorted({layer for mt in methods for layer in mt.student_attention_layers()})
    params = [p for p in model.parameters()] + [p for mt in methods for p in mt.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine = None
    if cfg.deepspeed:
        from kdpipe.stage2_distill.zero import wrap_student

        engine = wrap_student(model, optimizer, cfg.deepspeed, cfg.batch_size, cfg.grad_accum, cfg.clip, cfg.device)

    start = _restore(ckpt_dir, model, methods, optimizer, scheduler, engine, split) if cfg.resume else 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"config": asdict(cfg), "split": asdict(split), "student":
                                              student.description, "methods": [mt.describe() for mt in methods],
                                              "cache_fingerprint": m.data.fingerprint}, indent=2))

    padded = m.data.packing == "padded"
    run_student = student_runner(model, padded)
    evaluate_now = lambda: evaluate(model, eval_batches(cache, needs, split.eval_units, cfg.batch_size), device, padded)  # noqa: E731
    initial = evaluate_now() if split.eval_units and start == 0 else {}
    rank, world = distributed_env()
    metrics = open(out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl"), "a")
    if initial:
        metrics.write(json.dumps({"step": 0, **initial}) + "\n")
    if world > 1 and len(split.train_units) < world:
        raise UserError(f"{len(split.train_units)} training units cannot be split over {world} ranks: extract with "
                        f"a smaller --sequences-per-unit")
    batches = TrainBatches(cache, needs, split.train_units[rank::world], cfg.batch_size, cfg.seed, cfg.buffer_units,
                           skip=start * cfg.grad_accum, others=other_needs)  # each rank reads its own units
    bar = tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", disable=cfg.quiet, dynamic_ncols=True)
    tokens = 0
    t0 = time.perf_counter()
    final = dict(initial)
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
                                            scaling=cap.scaling, run=run_student)
                    terms = {f"{mt.name}/{k}": mt.weight * v for mt in methods
                             for k, v in mt.loss(batch, outputs, step).items()}
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
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in terms_sum.items()} |
                            {"tok/s": f"{record['tokens_per_s']:.0f}"})
            bar.update(1)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                _save(ckpt_dir, step + 1, model, methods, optimizer, scheduler, engine, split)
    finally:
        bar.close()
        batches.close()
        metrics.close()
    seconds = time.perf_counter() - t0
    _save_student(model, engine, out / "student")
    if rank == 0:
        _save_tokenizer(m.tokenizer.name, out / "student")
    (out / "final.json").write_text(json.dumps({"initial": initial, "final": final}, indent=2))
    return DistillResult(str(out), cfg.steps, final, initial, seconds, tokens / max(seconds, 1e-9))


def _save(directory: Path, step: int, model, methods, optimizer, scheduler, engine, split: Split) -> None:
    state = {"methods": [mt.state_dict() for mt in methods], "scheduler": scheduler.state_dict(),
             "split": asdict(split)}
    if engine is not None:  # ZeRO partitions the optimizer (and, at stage 3, the model): DeepSpeed saves them
        engine.save_checkpoint(str(directory), tag=f"step_{step:07d}",
                               client_state={**state, "step": step, "rng": torch.get_rng_state()})
        return
    checkpoint.save(directory, step, {**state, "student": model.state_dict(), "optimizer": optimizer.state_dict()})


def _restore(directory: Path, model, methods, optimizer, scheduler, engine, split: Split) -> int:
    """Load the latest checkpoint; return the step it was taken at (0 when there is none)."""
    if engine is not None:
        if not (directory / "latest").exists():
            return 0
        _, state = engine.load_checkpoint(str(directory))
        torch.set_rng_state(state["rng"])
    else:
        latest = checkpoint.latest(directory)
        if latest is None:
            return 0
        state = checkpoint.load(latest)
        model.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
    if state["split"] != asdict(split):
        raise UserError(f"the checkpoint in {directory} was trained on another train/eval split: use the same "
                        f"--seed, --eval-sequences and cache")
    for mt, sd in zip(methods, state["methods"]):
        mt.load_state_dict(sd)
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def _save_tokenizer(name: str, directory: Path) -> None:
    """The teacher's tokenizer beside the student, so the student can be a teacher in turn (TAKD); skipped
    when the tokenizer the cache was made with is no longer where it was."""
    from kdpipe.modelio import resolve_teacher
    from kdpipe.stage1_extract.teacher import load_tokenizer

    try:
        load_tokenizer(None, resolve_teacher(name)).save_pretrained(directory)
    except UserError:
        pass


def _save_student(model, engine, path: Path) -> None:
    """save_pretrained, with ZeRO-3's partitioned parameters gathered first."""
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if engine.global_rank == 0:
                model.save_pretrained(path, state_dict={k: v.clone() for k, v in model.state_dict().items()})
        return
    if getattr(model, "kdpipe_albert", False):  # shared/factorized: saved multiplied out, a plain model
        from kdpipe.stage2_distill.albert import export

        model = export(model)
    if engine is None or engine.global_rank == 0:
        model.save_pretrained(path)
