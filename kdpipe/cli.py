"""The `kdpipe` command line."""

from __future__ import annotations

import json
import sys

import click

from kdpipe import __version__
from kdpipe.console import metrics_change, plural
from kdpipe.errors import UserError
from kdpipe.pipeline.config import config_option


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad number list {text!r}: use e.g. 1,2") from None


def _fail(ctx: click.Context, message: str) -> None:
    """One line, exit code 2. zarr's I/O tasks that were cut short by the same failure would otherwise
    report their own copies of it through asyncio's logger as the process exits, and the ones that never
    started warn that their coroutine was never awaited."""
    import logging
    import warnings

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    click.echo(f"kdpipe: error: {message}", err=True)
    ctx.exit(2)


class _Group(click.Group):
    """Turns the mistakes a user can fix into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        from kdpipe.console import prepare_environment
        from kdpipe.distributed import leave_process_group
        from kdpipe.storage.writer import disk_error

        prepare_environment()
        try:
            result = super().invoke(ctx)
            leave_process_group()
            return result
        except UserError as exc:
            _fail(ctx, str(exc))
        except OSError as exc:
            err = disk_error(exc, exc.filename or "the output")
            if err is None:
                raise
            _fail(ctx, str(err))
        except KeyboardInterrupt:
            click.echo("kdpipe: interrupted; completed work units are kept: rerun with --resume", err=True)
            ctx.exit(130)


SIGNAL_BUDGET_HELP = ("Bytes per token for all hidden-state and attention arrays together, e.g. 8KB: kdpipe "
                      "chooses int8 codes, a projection of hidden states and the share of sequences that carry them "
                      "(printed, and recorded in the manifest).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="kdpipe")
def cli() -> None:
    """Offline knowledge distillation: run the teacher once (extract), train students from its cache."""


@cli.command()
@config_option("extract")
@click.option("--teacher", required=True, help="Teacher: a Hugging Face model directory, or a .gguf file.")
@click.option("--data", multiple=True, required=True,
              help="Corpus: text, .jsonl(.gz/.zst), parquet or Arrow files, datasets.save_to_disk directories, "
                   "directories or globs. Repeat for several.")
@click.option("--out", required=True, help="Output teacher cache (a directory).")
@click.option("--tokenizer", default=None, help="Tokenizer path if not the teacher's own.")
@click.option("--text-field", default="text", help="Field (jsonl) or column (parquet, Arrow) holding the text.")
@click.option("--messages-field", default=None,
              help="Chat data: the field holding each conversation, a list of {role, content} (e.g. messages); "
                   "rendered with the tokenizer's chat template, the assistant's tokens learned.")
@click.option("--learn-all-tokens", is_flag=True, help="Chat data: learn every token, not only the assistant's.")
@click.option("--seq-len", type=int, default=256, help="Tokens per sequence.")
@click.option("--packing", type=click.Choice(["packed", "padded"]), default="packed",
              help="packed: documents joined with EOS into full blocks (a conversation that fits is not cut); "
                   "padded: one document per row, lengths stored (no conversation sees another).")
@click.option("--keep-tail", is_flag=True,
              help="packed: keep the corpus tail that does not fill a last block, padded (its length stored).")
@click.option("--batch-size", type=int, default=8, help="Sequences per teacher forward.")
@click.option("--top-k", type=int, default=64, help="Logits kept per position.")
@click.option("--logit-codec", type=click.Choice(["compact", "float16"]), default="compact",
              help="compact: ranked ids and 8-bit log-probabilities (within 1/4 nat, ~98 B/token at k=64), draws as "
                   "ranked ids and uint8 counts (~28 B/token at M=12); float16: ids in logit order and float16 "
                   "log-probabilities (~197 B/token), raw uint16 draws (~35), as kdpipe 0.4 wrote.")
@click.option("--temperatures", default="1,2", help="Temperatures whose full-vocabulary logsumexp is stored (1 always is).")
@click.option("--sample-count", type=int, default=0, help="Draws per position from the teacher distribution (0: off).")
@click.option("--sample-temperature", type=float, default=1.0, help="Temperature of the sampled draws.")
@click.option("--sample-logprobs/--no-sample-logprobs", default=True,
              help="Store the drawn ids' 8-bit log-probabilities (a third of a sampled cache's bytes), which weight "
                   "the draws for losses at other temperatures than --sample-temperature; without them the draws "
                   "serve that temperature alone (and with --top-k 0 only its logsumexp and T=1's are stored).")
@click.option("--sampler", type=click.Choice(["systematic", "multinomial"]), default="systematic",
              help="systematic: m evenly spaced points from one random offset (each count floor or ceil of m*p, "
                   "unbiased); multinomial: m independent draws, as kdpipe 0.2 drew.")
@click.option("--seed", type=int, default=0, help="Seed of the sampled draws.")
@click.option("--hidden-layers", default="none", help="Hidden states to keep: all, none, uniform:N, last:N or 0,4,8 "
                                                      "(0 = embeddings).")
@click.option("--hidden-dtype", type=click.Choice(["float16", "bfloat16"]), default="float16")
@click.option("--hidden-keepbits", type=int, default=None, help="Lossy: keep this many mantissa bits of hidden states.")
@click.option("--attention-layers", default="none", help="Attention to keep: all, none, uniform:N, last:N or 1,6,12.")
@click.option("--attention-form", type=click.Choice(["probs", "factors"]), default="factors",
              help="probs: post-softmax maps (h*T*T); factors: post-RoPE Q/K/V (3*h*T*d), exact on read.")
@click.option("--attention-dtype", type=click.Choice(["float16", "uint8"]), default="float16",
              help="Storage of attention probs.")
@click.option("--signal-budget", default=None, help=SIGNAL_BUDGET_HELP)
@click.option("--hidden-codec", type=click.Choice(["float16", "int8"]), default="float16",
              help="Expert: int8 codes hidden states per vector in each channel's calibrated scale (survives massive "
                   "activations).")
@click.option("--hidden-rank", type=int, default=0,
              help="Expert: project hidden states to this many principal directions of the calibration tokens "
                   "(implies int8; 0: every channel).")
@click.option("--attention-codec", type=click.Choice(["float16", "int8"]), default="float16",
              help="Expert: int8 Q/K/V factors, one scale per (token, head).")
@click.option("--attention-rank", type=int, default=0,
              help="Expert: project each head's Q/K/V to this many calibrated directions, Q and K chosen to keep "
                   "the scores q.k (implies int8; 0: every dimension).")
@click.option("--signal-fraction", type=float, default=1.0,
              help="Expert: the share of each work unit's sequences that carry hidden states and attention "
                   "(the intermediate-layer losses average over them).")
@click.option("--position-fraction", type=float, default=1.0,
              help="Expert: the share of each sequence's positions (a stratified draw per sequence) that carry hidden "
                   "states and attention; the student's states are compared at those positions.")
@click.option("--position-spans", type=int, default=0,
              help="Expert: those positions as this many contiguous spans, one in each equal part of a sequence "
                   "(0: one position per part).")
@click.option("--interchange", "interchange_layers", default="none",
              help="DIITO: teacher layers (1..L-1: all, uniform:N or a list) of interchange interventions whose "
                   "counterfactual top-k is cached; one more teacher forward per batch.")
@click.option("--interchange-rate", type=float, default=0.3,
              help="DIITO: the interchanged span, as a fraction of the shorter sequence.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              help="Teacher compute dtype.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (hf engine: device_map over the GPUs).")
@click.option("--engine", type=click.Choice(["hf", "deepspeed"]), default="hf",
              help="hf: plain transformers; deepspeed: ZeRO-3 inference with parameters offloaded (ZeRO-Inference).")
@click.option("--offload", type=click.Choice(["cpu", "nvme"]), default="cpu",
              help="deepspeed engine: where the teacher's parameters live between uses.")
@click.option("--nvme-path", default=None, help="deepspeed engine with --offload nvme: a directory on a fast disk.")
@click.option("--deepspeed", default=None, type=click.Path(dir_okay=False),
              help="A DeepSpeed JSON config merged under kdpipe's ZeRO-3 inference settings (yours win).")
@click.option("--max-sequences", type=int, default=None, help="Stop after this many sequences.")
@click.option("--sequences-per-unit", type=int, default=16,
              help="Sequences per work unit (one shard; the unit of resume and of rank assignment).")
@click.option("--sequences-per-chunk", type=int, default=None,
              help="Sequences per compressed chunk; smaller than the unit turns on zarr sharding.")
@click.option("--logit-rows", type=int, default=512, help="Positions projected to the vocabulary at once.")
@click.option("--for-methods", default=None,
              help="Choose hidden/attention layers, attention form and temperatures for these methods, e.g. "
                   "tinybert,minilmv2 (with --student-layers).")
@click.option("--student-layers", type=int, default=None, help="With --for-methods: the students' layer count.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the teacher's own Python code.")
@click.option("--resume", is_flag=True, help="Continue an existing cache: done work units are skipped.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(**opts) -> None:
    """Run the teacher over a corpus and write its signals into a teacher cache."""
    from kdpipe.pipeline.commands import run_extract

    result = run_extract({k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()})
    state = "complete" if result.complete else "INCOMPLETE (rerun with --resume)"
    dropped = result.manifest.data.dropped_tokens
    tail = (f"; the corpus tail of {dropped} tokens that does not fill a block was left out (--keep-tail keeps it, "
            f"padded)" if dropped else "")
    click.echo(f"wrote {plural(result.sequences_written, 'sequence')} ({result.tokens_written} tokens) to {result.path} in "
               f"{result.seconds:.1f}s, {result.tokens_per_second:.0f} tokens/s; cache {state}{tail}")


@cli.command()
@config_option("distill")
@click.option("--cache", multiple=True, required=True, help="Teacher cache(s) to learn from.")
@click.option("--student", required=True,
              help="teacher:layers=6,hidden=256 (the teacher's shape, smaller), a config .json, or a model directory.")
@click.option("--method", multiple=True, default=["kd"],
              help="NAME[:key=value,...]; repeat to combine, e.g. --method kd:temperature=2 --method lm:weight=0.5.")
@click.option("--out", required=True, help="Run directory: checkpoints, metrics.jsonl, the saved student.")
@click.option("--init-from-teacher", default=None,
              help="Initialize the student from these teacher weights (DistilBERT-style); the teacher never runs.")
@click.option("--layer-map", default="uniform", help="uniform, skip, last, or explicit pairs 1:2,2:4.")
@click.option("--steps", type=int, default=100)
@click.option("--batch-size", type=int, default=8)
@click.option("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=5e-4)
@click.option("--weight-decay", type=float, default=0.01)
@click.option("--warmup", type=float, default=0.05, help="Warmup: a fraction of --steps (< 1) or a step count.")
@click.option("--min-lr-ratio", type=float, default=0.1, help="Cosine decay floor, as a fraction of --lr.")
@click.option("--clip", type=float, default=1.0, help="Gradient norm clipping.")
@click.option("--seed", type=int, default=0)
@click.option("--eval-every", type=int, default=0, help="Evaluate every N steps (0: at the end only).")
@click.option("--eval-sequences", type=int, default=None,
              help="Sequences held out for evaluation (whole units); default: 10% of the units, at most 64 sequences.")
@click.option("--save-every", type=int, default=0, help="Checkpoint every N steps (0: at the end only).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out (a finished run: nothing to do).")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@click.option("--deepspeed", default=None, type=click.Path(dir_okay=False), help="DeepSpeed JSON for ZeRO student training.")
@click.option("--device", default="cpu")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="auto: bf16 autocast where the device has it (CUDA), else fp32.")
@click.option("--allow-partial", is_flag=True, help="Train on the done units of an incomplete cache.")
@click.option("--report-to", multiple=True, default=["none"],
              help="Also log metrics.jsonl's records to tensorboard (RUN/tensorboard), mlflow (MLFLOW_TRACKING_URI, "
                   "else RUN/mlruns) or wandb (WANDB_MODE=offline works without a login); repeat for several.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--quiet", is_flag=True)
def distill(**opts) -> None:
    """Train a student from teacher cache(s) alone: the teacher is never loaded."""
    from kdpipe.pipeline.commands import run_distill

    result = run_distill({k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()})
    if result.already_finished:
        summary = metrics_change({}, result.final)
        click.echo(f"{result.out} already finished {result.steps} steps (held-out {summary or 'not evaluated'}): "
                   f"nothing to do; pass a larger --steps to continue it, or --overwrite to start again")
        return
    summary = metrics_change(result.initial, result.final)
    click.echo(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.tokens_per_second:.0f} tokens/s); "
               f"held-out {summary or 'not evaluated (--eval-sequences 0)'}; student saved to {result.out}/student")


@cli.command(name="eval")
@click.argument("student")
@click.option("--cache", required=True, help="The teacher cache to compare against.")
@click.option("--run", "run_dir", default=None, help="A kdpipe distill run directory: use its held-out units.")
@click.option("--max-sequences", type=int, default=None, help="Evaluate on at most this many sequences.")
@click.option("--batch-size", type=int, default=8)
@click.option("--device", default="cpu")
@click.option("--json", "as_json", is_flag=True)
def evaluate_command(student: str, cache: str, run_dir: str | None, max_sequences: int | None, batch_size: int,
                     device: str, as_json: bool) -> None:
    """Held-out CE/perplexity, KL to the teacher and top-1 agreement of any HF causal LM against a cache."""
    from kdpipe.pipeline.commands import run_eval

    metrics = run_eval(dict(student=student, cache=cache, run_dir=run_dir, max_sequences=max_sequences,
                            batch_size=batch_size, device=device))
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    teacher = (f"KL to the teacher {metrics['eval/kl_teacher']:.4f}" if "eval/kl_teacher" in metrics else
               f"cross-entropy to the teacher's draws {metrics['eval/ce_teacher']:.4f} (KL needs their log-probabilities)")
    click.echo(f"{student} on {metrics['sequences']} sequences of {cache}: cross-entropy {metrics['eval/ce']:.4f} "
               f"(perplexity {metrics['eval/ppl']:.2f}), {teacher}, "
               f"top-1 agreement {metrics['eval/top1_agreement']:.1%}, {metrics['tokens_per_s']:.0f} tokens/s")


@cli.command(name="run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--var", "variables", multiple=True, help="NAME=VALUE: set a recipe variable ([vars]); repeat.")
@click.option("--only", default=None, help="Run this one step (its dependencies must be done).")
@click.option("--force", is_flag=True, help="Run the chosen steps even if unchanged.")
@click.option("--workdir", default=None, help="Where step outputs go (default: the recipe's [run] workdir).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow steps that set trust_remote_code (a recipe is trusted like code: read it first).")
def run_command(recipe: str, variables: tuple[str, ...], only: str | None, force: bool, workdir: str | None,
                trust_remote_code: bool) -> None:
    """Run a recipe: named extract / distill / eval steps; unchanged steps are skipped."""
    from kdpipe.pipeline.recipe import run_recipe, table

    overrides = {}
    for item in variables:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UserError(f"bad --var {item!r}: use NAME=VALUE")
        overrides[name.strip()] = value
    results = run_recipe(recipe, overrides, only, force, echo=lambda message: click.echo(message, err=True),
                         workdir=workdir, trust_remote_code=trust_remote_code)
    click.echo(table(results))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def methods(as_json: bool) -> None:
    """The 25 GKD methods: paper, the teacher signals each needs, and whether it runs from the cache."""
    from kdpipe.stage2_distill.methods import METHODS, catalog

    rows = catalog.table(METHODS)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'method':14} {'status':16} {'paper':22} needs from the teacher")
    for r in rows:
        click.echo(f"{r['method']:14} {r['status']:16} {r['paper']:22} {r['needs']}")
    sampled = [name for name, cls in METHODS.items() if catalog.reads_samples(cls)]
    click.echo(f"\nfrom an importance-sampled cache (--top-k 0), with estimator=sampled: {', '.join(sampled)}; "
               f"every other logit method needs the top-k")
    click.echo("\nadaptations (cache (adapted)) and how to run the recipes:")
    for r in rows:
        if r["adaptation"]:
            click.echo(f"  {r['method']}: {r['adaptation']}")


@cli.command()
@click.option("--teacher", required=True, help="A config.json or model directory, or a size: llama-7b, llama-13b, "
                                               "llama-70b, llama-100b, smollm2-135m (built on the meta device).")
@click.option("--tokens", default="1e9", help="Corpus size in tokens.")
@click.option("--seq-len", type=int, default=2048)
@click.option("--batch-size", type=int, default=8, help="Sequences per forward, per GPU.")
@click.option("--top-k", type=int, default=64)
@click.option("--logit-codec", type=click.Choice(["compact", "float16"]), default="compact")
@click.option("--temperatures", default="1,2")
@click.option("--sample-count", type=int, default=0)
@click.option("--sample-logprobs/--no-sample-logprobs", default=True)
@click.option("--sample-temperature", type=float, default=1.0, help="Temperature of the draws (as for extract).")
@click.option("--hidden-layers", default="none")
@click.option("--attention-layers", default="none")
@click.option("--attention-form", type=click.Choice(["probs", "factors"]), default="factors")
@click.option("--signal-budget", default=None, help=SIGNAL_BUDGET_HELP)
@click.option("--hidden-codec", type=click.Choice(["float16", "int8"]), default="float16")
@click.option("--hidden-rank", type=int, default=0)
@click.option("--attention-codec", type=click.Choice(["float16", "int8"]), default="float16")
@click.option("--attention-rank", type=int, default=0)
@click.option("--signal-fraction", type=float, default=1.0)
@click.option("--position-fraction", type=float, default=1.0)
@click.option("--sequences-per-unit", type=int, default=16)
@click.option("--gpus", type=int, default=1)
@click.option("--gpu-memory", default="80GB", help="Memory per GPU.")
@click.option("--gpu-tflops", type=float, default=300.0, help="Sustained dense TFLOP/s per GPU in --dtype.")
@click.option("--memory-bandwidth", default="2TB/s",
              help="Sustained GPU memory bandwidth, for element-wise work (the logsumexp over the vocabulary, norms).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16")
@click.option("--offload", type=click.Choice(["none", "cpu", "nvme"]), default="none")
@click.option("--bandwidth", default="25GB/s", help="Parameter streaming bandwidth per GPU (PCIe / NVMe read).")
@click.option("--interconnect", default="150GB/s",
              help="All-gather bandwidth per GPU between GPUs (ZeRO-3): NVLink within a node; ~25GB/s over InfiniBand.")
@click.option("--logit-rows", type=int, default=512)
@click.option("--json", "as_json", is_flag=True)
def plan(**opts) -> None:
    """Memory, disk and time for an extraction, before it runs (exact where it can be; estimates marked)."""
    from kdpipe.pipeline.plan import PlanConfig, make_plan, parse_size, temperature_count

    as_json = opts.pop("as_json")
    for size in ("gpu_memory", "bandwidth", "interconnect", "memory_bandwidth", "tokens", "signal_budget"):
        if opts[size] is not None:
            opts[size] = parse_size(opts[size], "B" if size != "tokens" else "")
    opts["temperatures"] = temperature_count(_floats(opts["temperatures"]), opts["top_k"], opts["sample_logprobs"],
                                             opts.pop("sample_temperature"))
    opts["gpu_flops"] = opts.pop("gpu_tflops") * 1e12
    result = make_plan(PlanConfig(**opts))
    click.echo(json.dumps(result.data, indent=2) if as_json else result.format())


@cli.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and array table as JSON.")
@click.option("--stats", is_flag=True, help="Teacher entropy and top-k mass over the whole cache (dask), to choose k.")
@click.option("--plot", default=None, help="With --stats: write the distributions as a PNG here.")
def inspect(cache: str, as_json: bool, stats: bool, plot: str | None) -> None:
    """Show a cache's manifest, arrays (shape, dtype, stored bytes, compression, bytes per token) and progress."""
    from kdpipe.pipeline.report import cache_summary, format_summary

    if plot and not stats:
        raise UserError("--plot draws the --stats distributions: add --stats")
    summary = cache_summary(cache)
    if stats:
        from kdpipe.pipeline.stats import cache_stats, format_stats, plot_stats

        summary["stats"] = cache_stats(cache)
        if plot:
            summary["stats"]["plot"] = plot_stats(summary["stats"], plot)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(format_summary(summary))
    if stats:
        click.echo("\n" + format_stats(summary["stats"]))
        if plot:
            click.echo(f"  plot: {plot}")


@cli.command()
@click.argument("cache")
@click.option("--repair", is_flag=True, help="Clear the ledger flags of damaged units so `extract --resume` redoes them.")
def verify(cache: str, repair: bool) -> None:
    """Read every chunk (checksums) and check shapes, dtypes, the ledger and the data fingerprint."""
    from kdpipe.pipeline.report import run_verify

    run_verify(cache, repair)


@cli.command()
@click.option("--out", default="demo-out", help="Where the demo writes its cache, student run, report and plot.")
@click.option("--sequences", type=int, default=128, help="Sequences to extract.")
@click.option("--seq-len", type=int, default=128)
@click.option("--steps", type=int, default=150, help="Student training steps.")
@click.option("--quiet", is_flag=True)
def demo(out: str, sequences: int, seq_len: int, steps: int, quiet: bool) -> None:
    """Extract a teacher cache from the real SmolLM2-135M-Instruct over Shakespeare's Sonnets, distill a
    ~15M student from it, and report (offline; a few minutes on 2 CPU cores)."""
    from kdpipe.pipeline.demo import run_demo

    run_demo(out, sequences, seq_len, steps, quiet)


def main() -> None:
    cli(prog_name="kdpipe")


if __name__ == "__main__":
    sys.exit(main())
