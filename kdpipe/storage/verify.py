"""`kdpipe verify`: read every chunk (checksums), check shapes, dtypes, the ledger and the data fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from kdpipe.storage.fingerprint import data_fingerprint
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.schema import array_specs, unit_range
from kdpipe.storage.writer import LEDGER


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    damaged_units: set[int] = field(default_factory=set)
    units_done: int = 0
    units_total: int = 0
    chunks_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str, repair: bool = False) -> Report:
    """Check a cache; with `repair`, clear the ledger flags of damaged units so `--resume` redoes them."""
    group = zarr.open_group(path, mode="r+" if repair else "r")
    manifest = Manifest.from_dict(group.attrs.get("kdpipe"), where=path)
    report = Report()
    ledger = np.asarray(group[LEDGER][:]).astype(bool)
    report.units_total, report.units_done = len(ledger), int(ledger.sum())
    if len(ledger) != manifest.layout.num_units:
        report.problems.append(f"ledger has {len(ledger)} units, manifest says {manifest.layout.num_units}")
    if manifest.complete and not ledger.all():
        report.problems.append("manifest says complete but the ledger has undone units")

    for spec in array_specs(manifest):
        if spec.name not in group:
            report.problems.append(f"{spec.name}: missing")
            continue
        arr = group[spec.name]
        if tuple(arr.shape) != spec.shape or str(arr.dtype) != spec.dtype:
            report.problems.append(f"{spec.name}: shape {tuple(arr.shape)} {arr.dtype}, expected {spec.shape} {spec.dtype}")
            continue
        chunk = arr.chunks[0]
        for start in range(0, spec.shape[0], chunk):
            stop = min(start + chunk, spec.shape[0])
            unit = start // manifest.layout.sequences_per_unit
            if spec.name.startswith("tokens/") or ledger[unit]:
                try:
                    arr[start:stop]
                    report.chunks_read += 1
                except Exception as exc:  # noqa: BLE001 - any decode failure is damage to report
                    report.problems.append(f"{spec.name}: chunk of sequences {start}..{stop - 1} is damaged "
                                           f"({type(exc).__name__}: {exc})")
                    report.damaged_units.add(unit)

    if not any(p.startswith("tokens/") for p in report.problems):
        ids, lengths = group["tokens/input_ids"], group["tokens/length"]
        step = max(1, manifest.layout.sequences_per_unit)
        blocks = (np.asarray(ids[s:s + step]) for s in range(0, manifest.data.num_sequences, step))
        fp = data_fingerprint(blocks, np.asarray(lengths[:]), manifest.data.seq_len)
        if fp != manifest.data.fingerprint:
            report.problems.append(f"token ids do not match the manifest's data fingerprint ({fp[:12]} != "
                                   f"{manifest.data.fingerprint[:12]})")

    if repair and report.damaged_units:
        for unit in sorted(report.damaged_units):
            group[LEDGER][unit] = 0
        raw = dict(group.attrs["kdpipe"])
        raw["complete"] = False
        group.attrs["kdpipe"] = raw
    return report


def describe_units(manifest: Manifest, units: set[int]) -> str:
    return ", ".join(f"unit {u} (sequences {a}..{b - 1})" for u in sorted(units) for a, b in [unit_range(manifest, u)])
