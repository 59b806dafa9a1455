"""The teacher-cache manifest (group attribute `kdpipe`), format version 1.

The manifest is typed and validated on open: a store written by an unknown major version, or one
whose manifest is damaged, is refused with a message instead of being misread.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import Any

from kdpipe import __version__
from kdpipe.errors import UserError

FORMAT = "kdpipe-cache"
VERSION = 1


@dataclass
class TeacherInfo:
    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    config_sha256: str
    max_positions: int | None = None
    causal: bool = True
    config: dict[str, Any] = field(default_factory=dict)  # the full HF config: students of its shape need no teacher files


@dataclass
class TokenizerInfo:
    name: str
    vocab_sha256: str
    vocab_size: int
    special_ids: dict[str, int | None] = field(default_factory=dict)


@dataclass
class DataInfo:
    sources: list[str]
    seq_len: int
    num_sequences: int
    packing: str  # "packed" (EOS between documents) or "padded" (one document per row, lengths stored)
    fingerprint: str  # sha256 over all token ids and lengths
    num_tokens: int  # valid (non-padding) tokens
    dropped_tokens: int = 0


@dataclass
class SignalSpec:
    top_k: int
    temperatures: list[float]  # temperatures[0] is 1: `logits/topk_values` are log-probabilities at T=1
    sample_count: int = 0
    sample_temperature: float = 1.0
    seed: int = 0
    hidden_layers: list[int] = field(default_factory=list)
    hidden_dtype: str = "float16"  # "bfloat16" is stored as a uint16 view
    hidden_keepbits: int | None = None  # lossy mantissa rounding of hidden states, None = lossless
    attention_layers: list[int] = field(default_factory=list)
    attention_form: str | None = None  # "probs" or "factors"
    attention_dtype: str = "float16"  # probs only: "float16" or "uint8" (p * 255, rounded)
    attention_scaling: float | None = None  # softmax scale of Q K^T, needed to recompute from factors
    interchange_layers: list[int] = field(default_factory=list)  # DIITO: teacher layers of the interventions
    interchange_rate: float = 0.0  # DIITO: interchanged span, as a fraction of the shorter sequence


@dataclass
class Layout:
    sequences_per_unit: int  # one work unit = one shard of sequences, written by one writer
    sequences_per_chunk: int
    num_units: int
    codecs: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineInfo:
    name: str = "hf"
    device: str = "cpu"
    zero_stage: int | None = None
    offload: str | None = None
    world_size: int = 1


@dataclass
class Manifest:
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    data: DataInfo
    signals: SignalSpec
    layout: Layout
    engine: EngineInfo
    complete: bool = False
    format: str = FORMAT
    version: int = VERSION
    kdpipe_version: str = __version__
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "the cache") -> "Manifest":
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UserError(f"{where} is not a kdpipe teacher cache (no kdpipe manifest in its zarr.json)")
        version = raw.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise UserError(
                f"{where} has cache format version {version!r}; this kdpipe {__version__} reads version "
                f"{VERSION}: upgrade kdpipe"
            )
        sections = {
            "teacher": TeacherInfo, "tokenizer": TokenizerInfo, "data": DataInfo,
            "signals": SignalSpec, "layout": Layout, "engine": EngineInfo,
        }
        try:
            kwargs = {name: _build(kind, raw[name]) for name, kind in sections.items()}
            top = {f.name for f in dataclasses.fields(cls)} - set(sections)
            kwargs.update({k: raw[k] for k in top if k in raw})
            return cls(**kwargs)
        except (KeyError, TypeError) as exc:
            raise UserError(f"{where} has a damaged kdpipe manifest ({exc}); re-extract it with --overwrite") from None

    def identity(self) -> dict[str, Any]:
        """What must match for `--resume` to continue this store: everything that shapes its bytes."""
        return {
            "teacher.config_sha256": self.teacher.config_sha256,
            "teacher.dtype": self.teacher.dtype,
            "tokenizer.vocab_sha256": self.tokenizer.vocab_sha256,
            "data.fingerprint": self.data.fingerprint,
            "data.seq_len": self.data.seq_len,
            "data.packing": self.data.packing,
            "signals": dataclasses.asdict(self.signals),
            "layout": dataclasses.asdict(self.layout),
        }


def _build(kind: type, raw: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in raw.items() if k in known})
