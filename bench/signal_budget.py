"""Intermediate-layer methods from caches at several `--signal-budget`s against the exact cache: how many bytes of
hidden states and attention does a student need?

    python bench/signal_budget.py --out DIR [--sequences 384] [--seq-len 64] [--steps 200] [--reductions 2,6,24,48]
        [--ablate 24]

The real SmolLM2-135M-Instruct teacher over the shipped Sonnets (the methods bench's setup): one exact float16
cache with what TinyBERT, MiniLMv2 and PKD read for a 2-layer student (hidden states of layers 0, 15, 30; Q/K/V
factors of blocks 15 and 30), and one cache per reduction x at `--signal-budget` = exact bytes / x. The same
student (`teacher:layers=2,hidden=128`), seed, steps and held-out units train with tinybert+kd, minilmv2+kd and
pkd+kd from each; the exact cache also with seed 1, for the spread that the data order alone makes; and, at
the `--ablate` reduction, the ladder's order reversed (every channel in int8, fewer sequences) and fewer
positions of every sequence instead of fewer sequences (`--position-fraction`, one position in each of P
strata or `--position-spans` contiguous spans), at the same bytes. Printed and
written to DIR: held-out KL and perplexity per run (signal_budget.json, .md) and KL against stored bytes of
hidden states and attention per token (signal_budget.png). Each run is kept: the bench resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kdpipe.pipeline.demo import DEMO_CORPUS, smollm2_gguf
from kdpipe.pipeline.report import cache_summary, describe_signals
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer, resolve_teacher
from kdpipe.stage2_distill.trainer import DistillConfig, distill
from kdpipe.storage import budget

STUDENT = "teacher:layers=2,hidden=128"
METHODS = ("tinybert", "minilmv2", "pkd")
SIGNALS = dict(hidden_layers="0,15,30", attention_layers="15,30", attention_form="factors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", action="append", help="the corpus (files or globs; default: the shipped Sonnets)")
    ap.add_argument("--sequences", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reductions", default="2,6,24,48")
    ap.add_argument("--ablate", default="24",
                    help="the reduction also stored the ways --ablations names ('' for none)")
    ap.add_argument("--ablations", default="every-channel,positions,spans:1,spans:2",
                    help="what --ablate stores: every-channel, positions, spans:S")
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 for the exact cache (and --seeded's)")
    ap.add_argument("--seeded", default="", help="a reduction also trained at every seed, compared mean to mean")
    ap.add_argument("--methods", default=",".join(METHODS), help="the methods to train now (the report shows all kept)")
    args = ap.parse_args()
    work = Path(args.out)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    path = smollm2_gguf()
    source = resolve_teacher(str(path))
    model, tokenizer = load_teacher_and_tokenizer(source)
    c = model.config
    shapes = budget.Shapes(c.hidden_size, 3, 2, c.num_attention_heads, c.num_key_value_heads,
                           c.hidden_size // c.num_attention_heads, args.seq_len, "factors", 32)
    exact_bytes = sum(budget.bytes_per_token(budget.Settings(), shapes).values())
    common = dict(teacher=str(path), data=args.data or [str(DEMO_CORPUS)], seq_len=args.seq_len, batch_size=8, top_k=64,
                  max_sequences=args.sequences, sequences_per_unit=32, quiet=True, **SIGNALS)
    caches = {"exact": {}} | {f"1/{x}": dict(signal_budget=exact_bytes / float(x)) for x in args.reductions.split(",")}
    # the ladder keeps a quarter of the width before it drops sequences; the other way round at the same bytes:
    # every channel (int8) for fewer sequences
    if args.ablate and "every-channel" in args.ablations:
        full = budget.Settings("int8", 0, "int8")
        rows = int(exact_bytes / float(args.ablate) // (sum(budget.bytes_per_token(full, shapes).values()) / 32))
        caches[f"1/{args.ablate} every channel"] = dict(hidden_codec="int8", attention_codec="int8",
                                                        signal_fraction=rows / 32)
    # and fewer positions of every sequence instead of fewer sequences, at the ladder's quarter of the width: one
    # position in each of P strata, or P positions in S contiguous spans (`--ablations spans:S`)
    quarter = budget.Settings("int8", c.hidden_size // 4, "int8")
    per_position = (sum(budget.bytes_per_token(quarter, shapes).values()) + budget.POSITION_BYTES) / args.seq_len
    positions = int(exact_bytes / float(args.ablate or 1) // per_position)
    for kind in (a for a in args.ablations.split(",") if args.ablate and (a == "positions" or a.startswith("spans:"))):
        spans = int(kind.split(":")[1]) if kind != "positions" else 0
        name = f"1/{args.ablate} {positions} positions" + (f" in {spans} span" + "s" * (spans > 1) if spans else "")
        caches[name] = dict(hidden_rank=c.hidden_size // 4, attention_codec="int8",
                            position_fraction=positions / args.seq_len, position_spans=spans)
    info = {}
    for name, flags in caches.items():
        out = work / name.replace("1/", "budget-").replace(" every channel", "-full-width").replace(" ", "-")
        if not (out / "zarr.json").exists():
            start = time.perf_counter()
            extract(ExtractConfig(out=str(out), **flags, **common), model, tokenizer)
            print(f"extracted {name} in {time.perf_counter() - start:.0f} s", flush=True)
        summary = cache_summary(str(out))
        m = summary["manifest"]["signals"]
        raw = budget.Settings(m["hidden_codec"], m["hidden_rank"], m["attention_codec"], "float16",
                              m["signal_sequences"], m.get("signal_positions", 0), m.get("attention_rank", 0))
        info[name] = {"path": str(out), "budget": flags.get("signal_budget"), "stored": summary["signal_bytes_per_token"],
                      "raw": sum(budget.bytes_per_token(raw, shapes).values()),
                      "settings": describe_signals(m).split("hidden layers: ")[1]}
    del model

    results = {}
    seeded = {"exact", f"1/{args.seeded}"}
    for name, cache in info.items():
        for method in METHODS:
            for seed in range(args.seeds) if name in seeded else (0,):
                label = f"{method}+kd @ {name}" + (f" seed {seed}" if seed else "")
                file = work / "runs" / (label.replace(" ", "_").replace("/", "-").replace("@", "at") + ".json")
                if not file.exists() and method not in args.methods.split(","):
                    continue
                if not file.exists():
                    start = time.perf_counter()
                    result = distill(DistillConfig(
                        cache=[cache["path"]], student=STUDENT, out=str(file.with_suffix("")), method=[method, "kd"],
                        steps=args.steps, batch_size=8, lr=1e-3, warmup=0.1, eval_sequences=32, seed=seed,
                        overwrite=True, quiet=True))
                    file.write_text(json.dumps({**result.final, "s_per_step": (time.perf_counter() - start) / args.steps}))
                results[label] = {**json.loads(file.read_text()), "method": method, "cache": name, "seed": seed,
                                  "stored": cache["stored"], "raw": cache["raw"]}
                print(label, f"KL {results[label]['eval/kl_teacher']:.4f} ppl {results[label]['eval/ppl']:.1f}",
                      flush=True)
    (work / "signal_budget.json").write_text(json.dumps({"caches": info, "runs": results}, indent=1))
    table = markdown(info, results, args.seeds)
    (work / "signal_budget.md").write_text(table)
    print(table)
    plot(info, results, work / "signal_budget.png")


def seed_mean(results: dict, method: str, name: str, seeds: int) -> float | None:
    kls = [results.get(f"{method}+kd @ {name}" + (f" seed {s}" if s else ""), {}).get("eval/kl_teacher")
           for s in range(seeds)]
    return None if None in kls else sum(kls) / seeds


def against(results: dict, run: str, ref: str) -> str:
    """A run's held-out KL and its difference from the reference run's ('-' for a run not trained)."""
    if run not in results or ref not in results:
        return "-"
    r, base = results[run]["eval/kl_teacher"], results[ref]["eval/kl_teacher"]
    return f"{r:.4f} ({100 * (r / base - 1):+.2f}%)"


def markdown(info: dict, results: dict, seeds: int) -> str:
    lines = ["| cache | settings | hidden + attention B/token, raw / stored | " +
             " | ".join(f"{m}+kd KL (vs exact)" for m in METHODS) + " |", "|---|---|---|" + "---|" * len(METHODS)]
    for name, cache in info.items():
        cells = []
        cells = [against(results, f"{m}+kd @ {name}", f"{m}+kd @ exact") for m in METHODS]
        lines.append(f"| {name} | {cache['settings']} | {cache['raw']:,.0f} / {cache['stored']:,.0f} | "
                     + " | ".join(cells) + " |")
    cells = [against(results, f"{m}+kd @ exact seed 1", f"{m}+kd @ exact") for m in METHODS]
    lines.append("| exact, seed 1 | the spread of another data order and initialization | | " + " | ".join(cells) + " |")
    for name in info:
        if name == "exact" or seeds < 3:
            continue
        means = [(seed_mean(results, m, name, seeds), seed_mean(results, m, "exact", seeds)) for m in METHODS]
        if all(a is None for a, _ in means):
            continue
        cells = [f"{a:.4f} vs {b:.4f} ({100 * (a / b - 1):+.2f}%)" if a is not None and b is not None else "-"
                 for a, b in means]
        lines.append(f"| {name}, mean of seeds 0..{seeds - 1} | against the exact cache's mean | | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(info: dict, results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, color in zip(METHODS, ("#4c72b0", "#dd8452", "#55a868")):
        names = [n for n in info if n != "exact" and " " not in n and f"{method}+kd @ {n}" in results]  # the ladder
        xs = [info[n]["stored"] for n in names]
        ys = [results[f"{method}+kd @ {n}"]["eval/kl_teacher"] for n in names]
        ax.plot(xs, ys, "o-", color=color, label=f"{method}+kd, --signal-budget")
        for n in (n for n in info if n.endswith("positions") and f"{method}+kd @ {n}" in results):
            ax.plot([info[n]["stored"]], [results[f"{method}+kd @ {n}"]["eval/kl_teacher"]], "x", color=color,
                    markersize=9, label=f"{method}+kd, {n.split(' ', 1)[1]} of every sequence")
        ax.plot([info["exact"]["stored"]], [results[f"{method}+kd @ exact"]["eval/kl_teacher"]], "*", color=color,
                markersize=13, label=f"{method}+kd, exact float16")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the minor ticks' labels overlap
    ax.set_xticks([150, 300, 1000, 3000, 7000], ["150", "300", "1,000", "3,000", "7,000"])
    ax.set_xlabel("stored bytes per token of hidden states + attention (log scale)")
    ax.set_ylabel("held-out KL(teacher || student)")
    ax.set_title("SmolLM2-135M teacher, 2-layer student: KL against intermediate-signal bytes", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
