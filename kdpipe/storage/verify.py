"""`kdpipe verify`: every array against the manifest (shape, dtype, codecs), every chunk a done unit must
have present on disk and decoding (checksums), the ledger, and the data fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from kdpipe.storage.fingerprint import data_fingerprint
from kdpipe.storage.integrity import DamagedCache, missing_rows, objects, open_array, schema_problem
from kdpipe.storage.lock import DirectoryLock
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.schema import LEDGER, array_specs, ledger_spec, unit_range
from kdpipe.storage.writer import group_attrs, writable


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    damaged_units: set[int] = field(default_factory=set)
    units_done: int = 0
    units_total: int = 0
    chunks_read: int = 0
    metadata_damaged: bool = False  # an array's metadata does not match: only re-extracting can fix it

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str, repair: bool = False) -> Report:
    """Check a cache; with `repair`, clear the ledger flags of damaged units so `--resume` redoes them."""
    if repair:
        with DirectoryLock(path, "teacher cache"):
            return _verify(path, True)
    return _verify(path, False)


def _verify(path: str, repair: bool) -> Report:
    manifest = Manifest.from_dict(group_attrs(path).get("kdpipe"), where=path)
    group = zarr.open_group(path, mode="r+" if repair else "r")
    report = Report()
    try:
        ledger_arr = open_array(group, LEDGER, path)
        problem = schema_problem(ledger_arr, ledger_spec(manifest))
        if problem:
            raise DamagedCache(problem)
        ledger = np.asarray(ledger_arr[:]).astype(bool)
    except DamagedCache as exc:
        report.problems.append(f"{LEDGER}: {exc}")
        return report  # without the ledger nothing else can be judged
    report.units_total, report.units_done = len(ledger), int(ledger.sum())
    per = manifest.layout.sequences_per_unit
    if manifest.complete and not ledger.all():
        undone = np.flatnonzero(~ledger).tolist()
        report.problems.append(f"manifest says complete but work units {undone[:5]} are not marked done")
        report.damaged_units.update(undone)

    for spec in array_specs(manifest):
        try:
            arr = open_array(group, spec.name, path)
            problem = schema_problem(arr, spec)
        except DamagedCache as exc:
            problem = str(exc)
        if problem:
            report.problems.append(problem)
            report.metadata_damaged = True
            continue
        # token ids and tokenizer files are written when the store is created; everything else by its unit
        at_creation = spec.name.startswith("tokens/") or not spec.per_sequence
        rows = spec.unit_rows or per  # a subsampled cache's signal arrays: unit_rows rows a unit
        needed = [(a, b) for a, b, _ in objects(arr, 0, spec.shape[0]) if at_creation or ledger[a // rows]]
        missing = set(missing_rows(arr, 0, spec.shape[0]))
        for start, stop in needed:
            units = set(range(start // rows, (stop - 1) // rows + 1)) if spec.per_sequence else set(range(len(ledger)))
            where = (f"chunk of signal rows {start}..{stop - 1} (work unit {start // rows})" if spec.unit_rows else
                     f"chunk of sequences {start}..{stop - 1}" if spec.per_sequence else "its chunk")
            if (start, stop) in missing:
                report.problems.append(f"{spec.name}: {where} is missing")
                report.damaged_units.update(units)
                continue
            try:
                arr[start:stop]
                report.chunks_read += 1
            except Exception as exc:  # noqa: BLE001 - any decode failure is damage to report
                report.problems.append(f"{spec.name}: {where} is damaged ({type(exc).__name__}: {exc})")
                report.damaged_units.update(units)

    if not any(p.startswith(("tokens/", "tokenizer/")) for p in report.problems):
        ids, lengths = group["tokens/input_ids"], group["tokens/length"]
        blocks = (np.asarray(ids[s:s + per]) for s in range(0, manifest.data.num_sequences, per))
        fp = data_fingerprint(blocks, np.asarray(lengths[:]), manifest.data.seq_len)
        if fp != manifest.data.fingerprint:
            report.problems.append(f"token ids do not match the manifest's data fingerprint ({fp[:12]} != "
                                   f"{manifest.data.fingerprint[:12]})")

    if repair and report.damaged_units and not report.metadata_damaged:
        flags = writable(group, LEDGER)
        for unit in sorted(report.damaged_units):
            flags[unit] = 0
        raw = dict(group.attrs["kdpipe"])
        raw["complete"] = False
        group.attrs["kdpipe"] = raw
    return report


def describe_units(manifest: Manifest, units: set[int]) -> str:
    return ", ".join(f"unit {u} (sequences {a}..{b - 1})" for u in sorted(units) for a, b in [unit_range(manifest, u)])
