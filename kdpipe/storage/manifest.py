"""The teacher-cache manifest (group attribute `kdpipe`), format versions 1-5 (see VERSION), all read.

The manifest is typed and validated on open: a store written by an unknown major version, or one
whose manifest is damaged, is refused with a message instead of being misread.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from kdpipe import __version__
from kdpipe.errors import UserError

FORMAT = "kdpipe-cache"
# 2: the compact top-k (signals.topk_codec) or compressed hidden states; 3: hidden states and attention at some
# positions (signals.signal_positions), whose arrays an older kdpipe must not read as every position's; 4: the
# compact sampled draws (signals.sampled_codec), whose rank gaps an older kdpipe would read as ids; 5: attention
# factors projected per head (signals.attention_rank), whose codes an older kdpipe would read as Q/K/V. A cache is
# written with the lowest version that holds it (a float16 cache is still version 1)
VERSION = 5
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a file name, never a path


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
    weights_sha256: str = ""  # over the weight files' bytes: a resume with other weights is refused
    max_positions: int | None = None
    causal: bool = True
    config: dict[str, Any] = field(default_factory=dict)  # the full HF config: students of its shape need no teacher files


@dataclass
class TokenizerInfo:
    name: str
    vocab_sha256: str
    vocab_size: int
    special_ids: dict[str, int | None] = field(default_factory=dict)
    sha256: str = ""  # the whole tokenizer (vocabulary, merges, normalizer, special tokens)
    files: dict[str, int] = field(default_factory=dict)  # its save_pretrained files (name: bytes), kept in the cache


@dataclass
class DataInfo:
    sources: list[str]
    seq_len: int
    num_sequences: int
    packing: str  # "packed" (EOS between documents) or "padded" (one document per row, lengths stored)
    fingerprint: str  # sha256 over all token ids and lengths
    num_tokens: int  # valid (non-padding) tokens
    dropped_tokens: int = 0
    # chat data: `tokens/loss_mask` marks the tokens a student learns: "assistant" (its turns) or "all"
    loss_mask: str | None = None
    learned_tokens: int | None = None


def stored_temperatures(temperatures: list[float], top_k: int, sample_logprobs: bool = True,
                        sample_temperature: float = 1.0) -> list[float]:
    """The logsumexps an extraction stores: T=1 first (top-k values are log-probabilities at T=1 and its
    logsumexp turns them back into raw logits), then the other --temperatures; for draws alone without their
    log-probabilities, the sampling temperature only: another temperature's normalizer weights draws by their
    log-probabilities, which such a cache does not hold."""
    if not top_k and not sample_logprobs:
        temperatures = [t for t in temperatures if abs(t - sample_temperature) < 1e-9]
    rest = [float(t) for t in temperatures if abs(t - 1.0) > 1e-9]
    return [1.0] + list(dict.fromkeys(rest))


@dataclass
class SignalSpec:
    top_k: int
    temperatures: list[float]  # temperatures[0] is 1: `logits/topk_values` are log-probabilities at T=1
    sample_count: int = 0
    sample_temperature: float = 1.0
    # how the draws were made: "systematic" (kdpipe 0.3's default: one uniform offset, m evenly spaced points
    # in the cumulative distribution) or "multinomial" (m independent draws, what older caches hold)
    sampler: str = "multinomial"
    seed: int = 0
    # arrays added in kdpipe 0.2 (older caches read without them): the teacher's log-mass outside the top-k
    # per temperature, and the T=1 log-probabilities of the sampled ids (importance weights at another T)
    logtail: bool = False
    sampled_logprobs: bool = False
    # "compact-v1" (kdpipe 0.3's default, storage.topk_codec): ranked ids and 8-bit log-probabilities within
    # topk_error nats; "float16": ids in logit order and float16 log-probabilities (older caches)
    topk_codec: str = "float16"
    topk_error: float = 0.0
    # "compact-v1" (kdpipe 0.5's default, storage.sampled_codec): the draws' ids as rank gaps, uint8 counts;
    # "raw": uint16 ids in count order and uint16 counts (older caches)
    sampled_codec: str = "raw"
    hidden_layers: list[int] = field(default_factory=list)
    hidden_dtype: str = "float16"  # "bfloat16" is stored as a uint16 view
    hidden_keepbits: int | None = None  # lossy mantissa rounding of hidden states, None = lossless
    attention_layers: list[int] = field(default_factory=list)
    attention_form: str | None = None  # "probs" or "factors"
    attention_dtype: str = "float16"  # probs only: "float16" or "uint8" (p * 255, rounded)
    attention_scaling: float | None = None  # softmax scale of Q K^T, needed to recompute from factors
    attention_windows: list[int] = field(default_factory=list)  # per attention layer: sliding window, 0 = causal
    attention_softcap: float | None = None  # attention soft-capping (Gemma 2), applied when rebuilding
    interchange_layers: list[int] = field(default_factory=list)  # DIITO: teacher layers of the interventions
    interchange_rate: float = 0.0  # DIITO: interchanged span, as a fraction of the shorter sequence
    # compressed intermediate signals (storage.signal_codec), kdpipe 0.3: "int8" hidden states are coded in
    # each channel's calibrated scale, projected to `hidden_rank` dimensions (0: all) and quantized per vector;
    # "int8" attention factors per (token, head) vector; `signal_sequences` of every work unit carry hidden
    # states and attention (0: all of them), at `signal_positions` of each sequence's positions (0: all; format
    # version 3: drawn per sequence, one per stratum or in `position_spans` contiguous spans, stored in
    # `tokens/signal_positions`); format version 5: int8 factors projected per head to `attention_rank` of head_dim
    # dimensions (0: all; storage.signal_codec.FactorCodec, its arrays `{name}_center/_encoder/_decoder`). The
    # budget asked for, and
    # the error each layer's encoding measured on the calibration tokens (relative squared error, channel-scaled
    # hidden states / factors), are recorded.
    hidden_codec: str = "float16"
    hidden_rank: int = 0
    attention_codec: str = "float16"
    signal_sequences: int = 0
    signal_positions: int = 0
    position_spans: int = 0  # the positions as this many contiguous spans (0: one position per stratum)
    attention_rank: int = 0
    signal_budget: float | None = None
    hidden_error: list[float] = field(default_factory=list)
    attention_error: list[float] = field(default_factory=list)


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
            manifest = cls(**kwargs)
            _check_types(manifest, "")
            manifest._check_values()
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where} has a damaged kdpipe manifest ({exc}); re-extract it with --overwrite") from None
        return manifest

    def _check_values(self) -> None:
        """What the readers rely on: sizes that fit together, layers that exist, a T=1 first."""
        d, s, t, lay = self.data, self.signals, self.teacher, self.layout
        checks = [
            (d.seq_len > 0 and d.num_sequences >= 0, "data sizes"),
            (lay.sequences_per_unit > 0 and lay.sequences_per_chunk > 0
             and lay.sequences_per_unit % lay.sequences_per_chunk == 0, "layout sizes"),
            (lay.num_units == math.ceil(d.num_sequences / lay.sequences_per_unit), "layout.num_units"),
            (t.num_layers > 0 and t.hidden_size > 0 and t.num_heads > 0 and t.num_kv_heads > 0 and t.head_dim > 0
             and t.vocab_size > 0, "teacher sizes"),
            (0 <= s.top_k <= t.vocab_size and 0 <= s.sample_count and (s.top_k or s.sample_count),
             "signals.top_k / sample_count"),
            (bool(s.temperatures) and s.temperatures[0] == 1.0 and all(x > 0 for x in s.temperatures),
             "signals.temperatures"),
            (all(0 <= x <= t.num_layers for x in s.hidden_layers), "signals.hidden_layers"),
            (all(1 <= x <= t.num_layers for x in s.attention_layers + s.interchange_layers), "signals layers"),
            (s.attention_form in (None, "probs", "factors") and s.hidden_dtype in ("float16", "bfloat16")
             and s.attention_dtype in ("float16", "uint8"), "signals dtypes"),
            (d.packing in ("packed", "padded"), "data.packing"),
            (s.hidden_codec in ("float16", "int8") and s.attention_codec in ("float16", "int8")
             and 0 <= s.hidden_rank <= t.hidden_size and (s.hidden_codec == "int8" or not s.hidden_rank)
             and (s.attention_codec == "float16" or s.attention_form == "factors")
             and 0 <= s.signal_sequences <= lay.sequences_per_unit, "signals codecs"),
            (0 <= s.attention_rank < t.head_dim and (s.attention_codec == "int8" or not s.attention_rank),
             "signals.attention_rank"),
            (0 <= s.signal_positions <= d.seq_len and (not s.signal_positions or s.attention_form != "probs")
             and 0 <= s.position_spans <= s.signal_positions, "signals.signal_positions"),
            (s.sampler in ("multinomial", "systematic"), "signals.sampler"),
            (s.topk_codec in ("float16", "compact-v1") and s.topk_error >= 0
             and (s.topk_codec == "float16" or s.logtail), "signals.topk_codec"),  # compact: scaled to the tail
            (s.sampled_codec in ("raw", "compact-v1"), "signals.sampled_codec"),
            (len(s.attention_windows) in (0, len(s.attention_layers)) and all(w >= 0 for w in s.attention_windows),
             "signals.attention_windows"),
            (all(SAFE_NAME.match(n) and size > 0 for n, size in self.tokenizer.files.items()), "tokenizer.files"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"{what} out of range")

    @property
    def signal_rows(self) -> int:
        """Sequences of each full work unit that carry hidden states and attention (all, unless subsampled)."""
        return self.signals.signal_sequences or self.layout.sequences_per_unit

    @property
    def subsampled(self) -> bool:
        """Hidden states and attention are stored for some sequences only (`tokens/signal_row` says which)."""
        return self.signal_rows < self.layout.sequences_per_unit and self.stores_layers

    @property
    def signal_positions(self) -> int:
        """Positions of each sequence that carry hidden states and attention (all, unless position-subsampled)."""
        return self.signals.signal_positions or self.data.seq_len

    @property
    def position_subsampled(self) -> bool:
        """Hidden states and attention are stored at some positions of a sequence only (`tokens/signal_positions`)."""
        return self.signal_positions < self.data.seq_len and self.stores_layers

    @property
    def stores_layers(self) -> bool:
        """The cache holds hidden states or attention."""
        return bool(self.signals.hidden_layers or self.signals.attention_layers)

    @property
    def compact_topk(self) -> bool:
        """The top-k is stored in the compact encoding (storage.topk_codec)."""
        return bool(self.signals.top_k) and self.signals.topk_codec != "float16"

    @property
    def compact_sampled(self) -> bool:
        """The draws are stored in the compact encoding (storage.sampled_codec)."""
        return bool(self.signals.sample_count) and self.signals.sampled_codec != "raw"

    @property
    def ranked_ids(self) -> bool:
        """Ids are stored as ranks in the cache's rank -> id table (`logits/id_table`)."""
        return self.compact_topk or self.compact_sampled

    @property
    def compact_normalizers(self) -> bool:
        """The logsumexp is float32 at T=1 only, the other temperatures float16 log-norms (`logits/lognorm`)."""
        return self.compact_topk or (self.compact_sampled and not self.signals.top_k)

    def window(self, layer: int) -> int:
        """The sliding window of attention layer `layer` (0: plain causal; caches before windows were
        recorded hold none)."""
        s = self.signals
        return s.attention_windows[s.attention_layers.index(layer)] if s.attention_windows else 0

    def identity(self) -> dict[str, Any]:
        """What must match for `--resume` to continue this store: everything that shapes its bytes."""
        signals = dataclasses.asdict(self.signals)
        signals["attention_windows"] = [self.window(x) for x in self.signals.attention_layers]
        for added in ("logtail", "sampled_logprobs"):  # arrays a newer kdpipe adds: an older store resumes without
            signals.pop(added)
        if not self.signals.sample_count:
            signals.pop("sampler")
            signals.pop("sampled_codec")  # no draws: how they would be made does not shape the store
        for measured in ("topk_error", "signal_budget", "hidden_error", "attention_error"):
            signals.pop(measured)  # follow from the settings (a budget from the settings it chose)
        return {
            "teacher.config_sha256": self.teacher.config_sha256,
            "teacher.weights_sha256": self.teacher.weights_sha256,
            "teacher.dtype": self.teacher.dtype,
            "tokenizer.vocab_sha256": self.tokenizer.vocab_sha256,
            "tokenizer.sha256": self.tokenizer.sha256,
            "data.fingerprint": self.data.fingerprint,
            "data.seq_len": self.data.seq_len,
            "data.packing": self.data.packing,
            "data.loss_mask": self.data.loss_mask,
            "signals": signals,
            "layout": dataclasses.asdict(self.layout),
        }


def _build(kind: type, raw: dict[str, Any]) -> Any:
    if not isinstance(raw, dict):
        raise TypeError(f"{kind.__name__} is not a table")
    known = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in raw.items() if k in known})


def _check_types(obj: Any, where: str) -> None:
    """Every field of a (nested) manifest dataclass holds what its annotation says: a manifest is input,
    and a string where a layer list belongs must fail here, not deep inside a reader."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        name = f"{where}{f.name}"
        if dataclasses.is_dataclass(hint):
            _check_types(value, name + ".")
        elif not _matches(value, hint):
            raise TypeError(f"{name} is {type(value).__name__} {str(value)[:40]!r}")


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return isinstance(value, hint)
