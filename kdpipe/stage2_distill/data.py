"""Batches for training, read from the teacher cache only.

Only the signals and layers the chosen methods need are read. Work units (shards) are the unit of
reading: units are shuffled per epoch, `buffer_units` of them are loaded whole and their sequences
shuffled together, which keeps reads sequential and batches mixed. A background thread prefetches so
the student never waits on decompression (blosc releases the GIL). The order of batches is a pure
function of (seed, position), so a resumed run skips to where it was without reading what it skips.
The held-out split is whole units, chosen by seed and recorded in the run.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kdpipe.errors import UserError
from kdpipe.stage2_distill.methods.base import Batch, Needs, check_needs
from kdpipe.storage.reader import TeacherCache


@dataclass
class Split:
    train_units: list[int]
    eval_units: list[int]

    @classmethod
    def choose(cls, cache: TeacherCache, eval_sequences: int | None, seed: int, warn=None) -> "Split":
        """Whole units held out: `eval_sequences` worth (rounded up to units), or by default 10% of the units
        (at least one, at most 64 sequences' worth). A held-out share above 20% is said out loud."""
        units = np.flatnonzero(cache.units_done()).tolist()
        per = cache.manifest.layout.sequences_per_unit
        if eval_sequences is None:
            n_eval = max(1, min(-(-64 // per), len(units) // 10)) if len(units) >= 2 else 0
        elif eval_sequences > 0:
            if len(units) < 2:
                raise UserError(f"{cache.path} has {len(units)} work unit(s): too few to hold some out for "
                                f"evaluation; use --eval-sequences 0 or extract more data")
            n_eval = min(len(units) - 1, -(-eval_sequences // per))
        else:
            n_eval = 0
        if warn is not None and units and n_eval / len(units) > 0.2:
            warn(f"holding out {n_eval} of {len(units)} work units ({n_eval / len(units):.1%} of the cache) for "
                 f"evaluation, trained on {len(units) - n_eval}: extract more data, or set --eval-sequences "
                 f"(0: no held-out set)")
        order = np.random.default_rng([seed, 7]).permutation(units).tolist()
        return cls(train_units=sorted(order[n_eval:]), eval_units=sorted(order[:n_eval]))


def merge_needs(needs: list[Needs]) -> Needs:
    return Needs(topk=any(n.topk for n in needs), sampled=any(n.sampled for n in needs),
                 sampled_at=sorted({t for n in needs for t in n.sampled_at}),
                 hidden=sorted({layer for n in needs for layer in n.hidden}),
                 factors=sorted({layer for n in needs for layer in n.factors}),
                 attention=sorted({layer for n in needs for layer in n.attention}),
                 interchange=sorted({layer for n in needs for layer in n.interchange}))


def hidden_scales(cache: TeacherCache, layers: list[int], units: list[int],
                  sequences: int = 64) -> dict[int, torch.Tensor]:
    """Per teacher layer, the RMS of each channel [H] over the valid tokens of the first `sequences` training
    sequences (whole units, in order: the same on every rank and after a resume), in float64. A floor of 1e-3
    of the layer's overall RMS keeps a channel that is always ~0 from being blown up."""
    per = cache.manifest.layout.sequences_per_unit
    rows: list[int] = []
    for unit in sorted(units):
        unit_rows = np.arange(unit * per, min((unit + 1) * per, cache.num_sequences))
        rows += unit_rows[cache.signal_rows(unit_rows) >= 0].tolist()  # those that carry hidden states
        if len(rows) >= sequences:
            break
    if not rows or not layers:
        return {}
    index = np.array(rows)
    pos = cache.signal_positions(index)  # position-subsampled: the states are those of these positions
    at = np.arange(cache.seq_len)[None, :] if pos is None else pos
    valid = torch.from_numpy(at < cache.lengths(index)[:, None])
    scales = {}
    for layer in layers:
        h = torch.from_numpy(cache.hidden(layer, index)).double()[valid]  # [tokens, H]
        ms = (h * h).mean(0)
        scales[layer] = (ms + 1e-6 * ms.mean()).sqrt().float()
    return scales


LAYER_KEYS = ("hidden/", "attention/", "factors/", "signal_positions")


class UnitReader:
    """Reads the needed arrays of whole units and gathers batches from them."""

    def __init__(self, cache: TeacherCache, needs: Needs, per: int | None = None):
        self.cache, self.needs = cache, needs
        # another teacher's cache is read by the first cache's units, whatever its own layout
        self.per = per or cache.manifest.layout.sequences_per_unit

    @property
    def reads_layers(self) -> bool:
        n = self.needs
        return bool(n.hidden or n.attention or n.factors)

    def read_units(self, units: list[int]) -> dict[str, np.ndarray]:
        """The units' arrays, rows in order. Subsampled, hidden states and attention hold only the sequences
        that carry them, and `signal_pos` gives each sequence's row among those (-1: none)."""
        parts: dict[str, list[np.ndarray]] = {}
        subsampled = self.cache.manifest.subsampled and self.reads_layers
        offset = 0
        for unit in units:
            index = slice(unit * self.per, min((unit + 1) * self.per, self.cache.num_sequences))
            arrays = {"input_ids": self.cache.input_ids(index), "length": self.cache.lengths(index),
                      "sequence_ids": np.arange(index.start, index.stop)}
            layers = index
            if subsampled:
                have = self.cache.signal_rows(index) >= 0
                layers = index.start + np.flatnonzero(have)
                arrays["signal_pos"] = np.where(have, offset + np.cumsum(have) - 1, -1)
                offset += int(have.sum())
            if self.cache.manifest.data.loss_mask:
                arrays["loss_mask"] = self.cache.loss_mask(index)
            if self.needs.topk:
                arrays["topk_ids"], arrays["topk_logprobs"], arrays["logsumexp"] = self.cache.topk_logprobs(index)
                if self.cache.manifest.signals.logtail:
                    arrays["logtail"] = self.cache.logtail(index)
            if self.needs.sampled:
                arrays["sampled_ids"], arrays["sampled_counts"], logp = self.cache.draws(index)
                if logp is not None:
                    arrays["sampled_logprobs"] = logp
                if "logsumexp" not in arrays:  # the importance weights at another temperature use them
                    arrays["logsumexp"] = self.cache.logsumexp(index)
            if self.reads_layers and self.cache.manifest.position_subsampled:
                arrays["signal_positions"] = self.cache.signal_positions(layers)
            for layer in self.needs.hidden:
                arrays[f"hidden/{layer}"] = self.cache.hidden(layer, layers)
            for layer in self.needs.attention:
                arrays[f"attention/{layer}"] = self.cache.attention_probs(layer, layers)
            for layer in self.needs.factors:
                for part, x in zip("qkv", self.cache.attention_factors(layer, layers)):
                    arrays[f"factors/{layer}/{part}"] = x
            if self.needs.interchange:  # sources are sequences of the same unit, already read
                plan = self.cache.interchange(index)
                local = plan["source"] - index.start
                plan["source_ids"], plan["source_length"] = arrays["input_ids"][local], arrays["length"][local]
                arrays.update({f"interchange/{k}": v for k, v in plan.items()})
            for key, value in arrays.items():
                parts.setdefault(key, []).append(value)
        return {k: np.concatenate(v) for k, v in parts.items()}

    @staticmethod
    def batch(buffer: dict[str, np.ndarray], rows: np.ndarray) -> Batch:
        signal_rows = None
        layer_rows = rows
        if "signal_pos" in buffer:  # subsampled: hidden states and attention of the rows that carry them
            pos = buffer["signal_pos"][rows]
            signal_rows, layer_rows = torch.from_numpy(np.flatnonzero(pos >= 0)), pos[pos >= 0]
        pick = {k: torch.from_numpy(np.ascontiguousarray(v[layer_rows if k.startswith(LAYER_KEYS) else rows]))
                for k, v in buffer.items() if k != "signal_pos"}
        t = pick["input_ids"].shape[1]
        return Batch(
            input_ids=pick["input_ids"].long(),
            mask=torch.arange(t)[None, :] < pick["length"][:, None],
            loss_mask=pick.get("loss_mask"),
            topk_ids=pick.get("topk_ids"), topk_logprobs=pick.get("topk_logprobs"), logsumexp=pick.get("logsumexp"),
            logtail=pick.get("logtail"), sampled_ids=pick.get("sampled_ids"), sampled_counts=pick.get("sampled_counts"),
            sampled_logprobs=pick.get("sampled_logprobs"),
            hidden={int(k.split("/")[1]): v for k, v in pick.items() if k.startswith("hidden/")},
            attention={int(k.split("/")[1]): v for k, v in pick.items() if k.startswith("attention/")},
            factors={layer: tuple(pick[f"factors/{layer}/{p}"] for p in "qkv")
                     for layer in {int(k.split("/")[1]) for k in pick if k.startswith("factors/")}},
            interchange={k.split("/", 1)[1]: v for k, v in pick.items() if k.startswith("interchange/")},
            sequence_ids=pick["sequence_ids"], signal_rows=signal_rows, signal_positions=pick.get("signal_positions"),
        )


def plan(units: list[int], per_unit: int, num_sequences: int, batch_size: int, buffer_units: int,
         seed: int, carries: dict[int, np.ndarray] | None = None,
         least: int = 1) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Endless (units of the buffer, row indices within the buffer) per batch; deterministic in seed.
    `carries` (unit -> bool per sequence) stratifies the batches of a subsampled cache: each holds its share of
    the sequences that carry hidden states and attention, at least `least` (those rows then recur within a
    buffer more often than the others), so that every batch's intermediate-layer losses have rows to average over."""
    if not units:
        raise UserError("no complete work units to train on")
    sizes = {u: min(per_unit, num_sequences - u * per_unit) for u in units}
    if sum(sizes.values()) < batch_size:
        raise UserError(f"--batch-size {batch_size} is larger than the {sum(sizes.values())} training sequences")
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(units).tolist()
        for g in range(0, len(order), buffer_units):
            group = tuple(order[g:g + buffer_units])
            if carries is None:
                rows = rng.permutation(sum(sizes[u] for u in group))
                for b in range(0, len(rows) - batch_size + 1, batch_size):
                    yield group, rows[b:b + batch_size]
                continue
            flags = np.concatenate([carries[u] for u in group])
            signal, plain = rng.permutation(np.flatnonzero(flags)), rng.permutation(np.flatnonzero(~flags))
            share = min(batch_size, len(signal), max(least, round(batch_size * len(signal) / len(flags))))
            rest = batch_size - share
            count = len(plain) // rest if rest else len(signal) // share
            for b in range(count):
                picked = signal[(b * share + np.arange(share)) % len(signal)]
                yield group, np.concatenate([picked, plain[b * rest:(b + 1) * rest]])
        epoch += 1


class TrainBatches(torch.utils.data.IterableDataset):
    """Prefetched training batches from position `skip` on: iterate to get `Batch`es (a torch
    IterableDataset that batches itself: use it directly, or in a DataLoader with batch_size=None)."""

    def __init__(self, cache: TeacherCache, needs: Needs, units: list[int], batch_size: int, seed: int,
                 buffer_units: int = 4, skip: int = 0, prefetch: int = 4,
                 others: list[tuple[TeacherCache, Needs]] = (), least_signal_rows: int = 1):
        super().__init__()
        self.reader = UnitReader(cache, needs)
        self.others = [UnitReader(c, n, self.reader.per) for c, n in others]
        carries = None
        if cache.manifest.subsampled and self.reader.reads_layers:
            per = self.reader.per
            carries = {u: cache.signal_rows(np.arange(u * per, min((u + 1) * per, cache.num_sequences))) >= 0
                       for u in units}
        self._plan = plan(units, self.reader.per, cache.num_sequences, batch_size, buffer_units, seed, carries,
                          least_signal_rows)
        for _ in range(skip):
            next(self._plan)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="kdpipe-reader", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        group, buffers = None, []
        readers = [self.reader, *self.others]
        try:
            for units, rows in self._plan:
                if self._stop.is_set():
                    return
                if units != group:
                    group, buffers = units, [r.read_units(list(units)) for r in readers]
                batch = self.reader.batch(buffers[0], rows)
                batch.others = [r.batch(b, rows) for r, b in zip(self.others, buffers[1:])]
                self._queue.put(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put(exc)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)


def eval_batches(cache: TeacherCache, needs: Needs, units: list[int], batch_size: int,
                 max_sequences: int | None = None) -> Iterator[Batch]:
    """The held-out units in order, in batches (the last one may be smaller), each unit read once;
    at most `max_sequences` sequences in all."""
    reader = UnitReader(cache, needs)
    left = cache.num_sequences if max_sequences is None else max_sequences
    for g in range(0, len(units), 4):
        buffer = reader.read_units(units[g:g + 4])
        n = len(buffer["input_ids"])
        for b in range(0, n, batch_size):
            rows = np.arange(b, min(n, b + batch_size))[:left]
            if not len(rows):
                return
            left -= len(rows)
            yield reader.batch(buffer, rows)


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


def signal_layout(cache: TeacherCache) -> tuple[np.ndarray, np.ndarray | None]:
    """Each sequence's row in a cache's hidden-state and attention arrays, and those rows' positions (None: every
    position)."""
    rows = cache.signal_rows()
    return rows, cache.signal_positions(rows[rows >= 0])


def same_layout(a: tuple[np.ndarray, np.ndarray | None], b: tuple[np.ndarray, np.ndarray | None]) -> bool:
    (rows_a, pos_a), (rows_b, pos_b) = a, b
    return np.array_equal(rows_a, rows_b) and (pos_a is None) == (pos_b is None) and (
        pos_a is None or np.array_equal(pos_a, pos_b))


def check_teachers(caches: list[TeacherCache], methods, student_vocab: int | None = None) -> None:
    """Every method's needs against every cache; the logits a method reads must be over the student's
    vocabulary: the same tokenizer and the same number of logits, for every teacher."""
    if len(caches) > 1 and not any(mt.teacher_needs(i) != Needs() for mt in methods for i in range(1, len(caches))):
        raise UserError(f"{len(caches)} caches given but no chosen method reads more than one teacher: add a "
                        f"multi-teacher method (tmkd, mt_bert, rl_kd, uncertainty, dgkd) or pass one --cache")
    first = caches[0].manifest
    layered = [i for i in range(len(caches)) if any(mt.teacher_needs(i) != Needs() and (
        mt.teacher_needs(i).hidden or mt.teacher_needs(i).factors or mt.teacher_needs(i).attention) for mt in methods)]
    if len(layered) > 1 and any(caches[i].manifest.subsampled or caches[i].manifest.position_subsampled
                                for i in layered):
        base = signal_layout(caches[0])
        if layered[0] != 0 or any(not same_layout(signal_layout(caches[i]), base) for i in layered):
            raise UserError(f"the hidden states or attention of {caches[layered[-1]].path} and {caches[0].path} come "
                            f"from different sequences or positions (--signal-budget / --signal-fraction / "
                            f"--position-fraction): extract every teacher with the same signal settings, --seed and "
                            f"--sequences-per-unit")
    for i, cache in enumerate(caches):
        check_needs(methods, cache.manifest, cache.path, i)
        reads_logits = any(mt.teacher_needs(i).topk or mt.teacher_needs(i).sampled for mt in methods)
        if not reads_logits:
            continue
        m = cache.manifest
        if i and (m.tokenizer.vocab_sha256 != first.tokenizer.vocab_sha256 or m.teacher.vocab_size != first.teacher.vocab_size):
            raise UserError(f"{cache.path} and {caches[0].path} come from teachers with different vocabularies "
                            f"({m.teacher.vocab_size} and {first.teacher.vocab_size} logits): logit methods across "
                            f"teachers need one tokenizer and one vocabulary")
        if student_vocab is not None and m.teacher.vocab_size != student_vocab:
            raise UserError(f"the student has {student_vocab} logits but the teacher of {cache.path} has "
                            f"{m.teacher.vocab_size}: logit distillation needs the same vocabulary")
