"""What `kdpipe inspect` and `kdpipe verify` print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from kdpipe.console import plural
from kdpipe.errors import UserError
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.schema import array_specs
from kdpipe.storage.verify import describe_units, verify
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.writer import group_attrs, store_bytes


def open_manifest(path: str) -> Manifest:
    """The manifest of the cache at `path`, or one clear error if there is no cache there."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no teacher cache at {path}: run `kdpipe extract --out {path}` first")
    if not (p / "zarr.json").exists():
        raise UserError(f"{path} is not a kdpipe teacher cache (no zarr.json)")
    return Manifest.from_dict(group_attrs(path).get("kdpipe"), where=path)


def cache_summary(path: str) -> dict[str, Any]:
    cache = TeacherCache(path, allow_partial=True)
    m = cache.manifest
    tokens = max(1, m.data.num_tokens)
    arrays = []
    for spec in array_specs(m):
        raw = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        stored = store_bytes(path, spec.name)
        arrays.append({"name": spec.name, "shape": list(spec.shape), "dtype": spec.logical_dtype or spec.dtype,
                       "raw_bytes": raw, "stored_bytes": stored,
                       "ratio": raw / stored if stored else None, "bytes_per_token": stored / tokens})
    done, total = cache.progress()
    full_fp16 = 2 * m.teacher.vocab_size
    logit_bytes = sum(a["bytes_per_token"] for a in arrays if a["name"].split("/")[0] in ("logits", "sampled"))
    mode = ("sampled" if not m.signals.top_k else "compact top-k" if m.compact_topk else "float16 top-k")
    signal_bytes = sum(a["bytes_per_token"] for a in arrays if a["name"].split("/")[0] in ("hidden", "attention")
                       or a["name"] == "tokens/signal_positions")
    return {"path": path, "manifest": m.to_dict(), "logits_mode": mode, "arrays": arrays, "units_done": done,
            "units_total": total,
            "logit_bytes_per_token": logit_bytes, "signal_bytes_per_token": signal_bytes,
            "full_fp16_logits_ratio": full_fp16 / logit_bytes if logit_bytes else None}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _listed(values: list) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def describe_signals(sig: dict[str, Any]) -> str:
    coded = "compact: ranked ids, 8-bit counts" if sig.get("sampled_codec", "raw") != "raw" else "raw uint16 ids"
    if sig["sample_count"] and not sig.get("sampled_logprobs"):
        coded += f"; no log-probabilities: serves T={sig.get('sample_temperature', 1.0):g} only"
    sampled = (f"{plural(sig['sample_count'], 'draw')} per position ({sig.get('sampler', 'multinomial')}; {coded})"
               if sig["sample_count"] else "none")
    hidden = f"{_listed(sig['hidden_layers'])} ({sig['hidden_dtype']})" if sig["hidden_layers"] else "none"
    if sig["hidden_layers"] and sig.get("hidden_codec") == "int8":
        width = f", projected to {sig['hidden_rank']} dims" if sig.get("hidden_rank") else ""
        errors = sig.get("hidden_error") or []
        hidden = (f"{_listed(sig['hidden_layers'])} (int8 per vector in calibrated channel scale{width}; "
                  f"relative squared error {min(errors):.3g}..{max(errors):.3g} on the calibration tokens)"
                  if errors else f"{_listed(sig['hidden_layers'])} (int8{width})")
    attention = (f"{sig['attention_form']} of blocks {_listed(sig['attention_layers'])}" if sig["attention_layers"]
                 else "none")
    if sig["attention_layers"] and sig.get("attention_codec") == "int8":
        rank = sig.get("attention_rank")
        errors = sig.get("attention_error") or []
        width = f", projected to {rank} dims a head" if rank else ""
        worst = ", the worst of the scores q.k and v" if rank else ""
        error = f"; relative squared error {max(errors):.3g}{worst}" if errors else ""
        attention += f" (int8 per (token, head){width}{error})"
    if sig.get("signal_sequences") and (sig["hidden_layers"] or sig["attention_layers"]):
        attention += f"; hidden states and attention for {sig['signal_sequences']} sequences of every work unit"
    if sig.get("signal_positions") and (sig["hidden_layers"] or sig["attention_layers"]):
        spans = sig.get("position_spans", 0)
        attention += f"; at {sig['signal_positions']} positions of every sequence" + (
            f" (in {spans} span{'s' if spans > 1 else ''})" if spans else "")
    if sig.get("signal_budget"):
        attention += f" (--signal-budget {sig['signal_budget']:,.0f} B/token)"
    codec = sig.get("topk_codec", "float16")
    mode = (f"compact (ranked ids, 8-bit log-probabilities within {sig.get('topk_error', 0):g} nats)"
            if codec != "float16" else "float16")
    logits = f"top-{sig['top_k']} {mode}" if sig["top_k"] else "importance-sampled only (no top-k)"
    return (f"{logits} at T={_listed(sig['temperatures'])}; sampled: {sampled}; hidden layers: {hidden}; "
            f"attention: {attention}")


def format_summary(s: dict[str, Any]) -> str:
    m = s["manifest"]
    t, d, sig, lay = m["teacher"], m["data"], m["signals"], m["layout"]
    status = "complete" if m["complete"] else "INCOMPLETE"
    lines = [
        f"kdpipe cache {s['path']}  (format v{m['version']}, kdpipe {m['kdpipe_version']}, {status}: "
        f"{s['units_done']}/{s['units_total']} work units)",
        f"teacher   {t['name']}  {t['architecture']}  layers={t['num_layers']} hidden={t['hidden_size']} "
        f"heads={t['num_heads']}/{t['num_kv_heads']} vocab={t['vocab_size']} dtype={t['dtype']}",
        f"data      {d['num_sequences']} x {d['seq_len']} tokens ({d['packing']}), {d['num_tokens']} valid, "
        + (f"chat: {d.get('learned_tokens')} learned ({d['loss_mask']} tokens), " if d.get("loss_mask") else "")
        + f"fingerprint {d['fingerprint'][:16]}",
        f"signals   {describe_signals(sig)}",
        f"layout    {plural(lay['sequences_per_unit'], 'sequence')} per unit, {lay['sequences_per_chunk']} per chunk; "
        f"engine {m['engine']['name']} on {m['engine']['device']}",
        "",
        f"{'array':32} {'shape':>22} {'dtype':>9} {'stored':>11} {'ratio':>7} {'B/token':>9}",
    ]
    for a in s["arrays"]:
        ratio = f"{a['ratio']:.2f}" if a["ratio"] else "-"
        lines.append(f"{a['name']:32} {str(tuple(a['shape'])):>22} {a['dtype']:>9} {_size(a['stored_bytes']):>11} "
                     f"{ratio:>7} {a['bytes_per_token']:>9.1f}")
    total = sum(a["stored_bytes"] for a in s["arrays"])
    lines.append(f"{'total':32} {'':>22} {'':>9} {_size(total):>11}")
    if s["full_fp16_logits_ratio"]:
        lines.append(f"logits ({s['logits_mode']}; top-k, draws, logsumexp, log tail): "
                     f"{s['logit_bytes_per_token']:.1f} B/token, "
                     f"{s['full_fp16_logits_ratio']:.0f}x smaller than full fp16 logits")
    if s["signal_bytes_per_token"]:
        lines.append(f"hidden states and attention: {s['signal_bytes_per_token']:.1f} B/token stored")
    return "\n".join(lines)


def run_verify(path: str, repair: bool) -> None:
    manifest = open_manifest(path)
    report = verify(path, repair=repair)
    for problem in report.problems:
        click.echo(f"  {problem}")
    click.echo(f"read {report.chunks_read} chunks; {report.units_done}/{report.units_total} work units done")
    if report.units_done < report.units_total and not report.damaged_units:
        click.echo(f"cache is incomplete: finish it with `kdpipe extract --resume --out {path}` and the same settings")
    if not report.ok:
        first = report.problems[0]
        if report.damaged_units and not report.metadata_damaged:
            where = describe_units(manifest, report.damaged_units)
            fix = ("ledger flags cleared" if repair else "run `kdpipe verify --repair` to clear their ledger flags")
            raise UserError(f"{len(report.problems)} problem(s) ({first}), damaged: {where}; {fix}, then "
                            f"`kdpipe extract --resume` re-extracts them")
        raise UserError(f"{len(report.problems)} problem(s) in {path} ({first}): re-extract it with --overwrite")
    if report.units_done < report.units_total:
        raise UserError(f"{path} is incomplete ({report.units_done}/{report.units_total} units): "
                        f"rerun `kdpipe extract --resume`")
    click.echo(f"ok: {path} verified")
