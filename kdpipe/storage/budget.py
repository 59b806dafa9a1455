"""`--signal-budget`: the hidden-state and attention settings that fit a number of bytes per token.

Bytes are counted before compression, from the array shapes alone, so `kdpipe plan` and `kdpipe extract`
choose the same settings without running the teacher. The ladder, cheapest loss of information first:

1. the exact float16 cache, if it fits;
2. 8 bits: channel-scaled int8 hidden states (storage.signal_codec) and int8 attention factors (uint8
   probabilities), every sequence;
3. hidden states projected to fewer dimensions, every sequence, down to a quarter of the width;
4. attention factors projected per head to a quarter of the head's dimensions (`attention_rank`, kept
   scores: storage.signal_codec.FactorCodec), every sequence, at as many hidden dimensions as that leaves;
5. at both quarters, fewer sequences of each work unit (`signal_sequences`), then as many hidden
   dimensions as the budget leaves at that count;
6. one sequence a unit at a hidden rank below a quarter, down to RANK_FLOOR.

Below that the budget cannot be met, which is one error naming the smallest budget that works. Fewer
positions of every sequence (`signal_positions`, `--position-fraction`) give the same bytes another way; the
ladder does not use them: at 1/24 of the exact bytes TinyBERT+kd ended +5.0% (stratified positions) to +7.4%
(one span) in held-out KL from the exact cache's student, against +2.1% from fewer sequences (bench/RESULTS.md).
Step 4 before 5: at 1/24 of the exact bytes, Q/K/V at 16 of 64 dimensions for 9 of every 32 sequences left
TinyBERT+kd +0.69% in held-out KL from the exact cache's student (three seeds), against +1.91% with all 64
dimensions for 4 of 32 (bench/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdpipe.errors import UserError

RANK_FLOOR = 8  # the smallest projection the ladder uses
RANK_STEP = 8  # projections are multiples of 8 dimensions
POSITION_BYTES = 2  # tokens/signal_positions: an int16 per stored position


@dataclass(frozen=True)
class Shapes:
    """What the intermediate signals' bytes depend on."""
    hidden_size: int
    hidden_layers: int
    attention_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int
    attention_form: str | None  # "factors" or "probs"
    sequences_per_unit: int


@dataclass(frozen=True)
class Settings:
    hidden_codec: str = "float16"
    hidden_rank: int = 0  # int8 only; 0: every channel
    attention_codec: str = "float16"  # factors: "int8"
    attention_dtype: str = "float16"  # probs: "uint8"
    signal_sequences: int = 0  # per work unit; 0: all
    signal_positions: int = 0  # per sequence; 0: all
    attention_rank: int = 0  # int8 factors projected per head to this many dimensions; 0: all

    def describe(self, shapes: Shapes) -> str:
        if self == Settings():
            return "exact (float16)"
        parts = []
        if shapes.hidden_layers:
            width = f", projected to {self.hidden_rank} of {shapes.hidden_size} dims" if self.hidden_rank else ""
            parts.append(f"hidden {self.hidden_codec}{width}")
        if shapes.attention_layers:
            code = self.attention_codec if shapes.attention_form == "factors" else self.attention_dtype
            rank = self.attention_rank
            width = f", projected to {rank} of {shapes.head_dim} dims a head" if rank else ""
            parts.append(f"attention {code}{width}")
        parts.append(f"{self.signal_sequences} of every {shapes.sequences_per_unit} sequences" if self.signal_sequences
                     else "every sequence")
        if self.signal_positions:
            parts.append(f"{self.signal_positions} of every {shapes.seq_len} positions")
        return ", ".join(parts)


def hidden_bytes(s: Settings, shapes: Shapes) -> float:
    """Bytes per stored token of one hidden layer."""
    if s.hidden_codec == "int8":
        return (s.hidden_rank or shapes.hidden_size) + 2  # int8 coordinates, a float16 step
    return 2 * shapes.hidden_size


def attention_bytes(s: Settings, shapes: Shapes) -> float:
    """Bytes per stored token of one attention layer."""
    if shapes.attention_form == "probs":
        return shapes.num_heads * shapes.seq_len * (1 if s.attention_dtype == "uint8" else 2)
    vectors = shapes.num_heads + 2 * shapes.num_kv_heads
    return vectors * ((s.attention_rank or shapes.head_dim) + 2 if s.attention_codec == "int8" else 2 * shapes.head_dim)


def rate(s: Settings, shapes: Shapes) -> float:
    """The share of the corpus's tokens whose hidden states and attention are stored."""
    return ((s.signal_sequences or shapes.sequences_per_unit) / shapes.sequences_per_unit
            * (s.signal_positions or shapes.seq_len) / shapes.seq_len)


def bytes_per_token(s: Settings, shapes: Shapes) -> dict[str, float]:
    """{"hidden": ..., "attention": ...} per corpus token, before compression (signals not stored are left out)."""
    out = {}
    if shapes.hidden_layers:
        out["hidden"] = rate(s, shapes) * shapes.hidden_layers * hidden_bytes(s, shapes)
    if shapes.attention_layers:
        out["attention"] = rate(s, shapes) * shapes.attention_layers * attention_bytes(s, shapes)
    if s.signal_positions:
        out["signal_positions"] = rate(s, shapes) * POSITION_BYTES
    return out


def _total(s: Settings, shapes: Shapes) -> float:
    return sum(bytes_per_token(s, shapes).values())


def _int8(shapes: Shapes, rank: int = 0, rows: int = 0, attention_rank: int = 0) -> Settings:
    factors = shapes.attention_form == "factors"
    rank = 0 if rank >= shapes.hidden_size else rank
    attention_rank = attention_rank if factors and shapes.attention_layers and attention_rank < shapes.head_dim else 0
    return Settings("int8" if shapes.hidden_layers else "float16", rank if shapes.hidden_layers else 0,
                    "int8" if factors and shapes.attention_layers else "float16",
                    "uint8" if not factors and shapes.attention_layers else "float16",
                    0 if rows >= shapes.sequences_per_unit else rows, attention_rank=attention_rank)


def attention_quarter(shapes: Shapes) -> int:
    """The ladder's attention rank: a quarter of a head's dimensions (at least 8; 0 when that is all of them)."""
    rank = max(8, shapes.head_dim // 4)
    return rank if shapes.attention_form == "factors" and rank < shapes.head_dim else 0


def _widest(shapes: Shapes, rows: int, budget: float, low: int, attention_rank: int = 0) -> Settings | None:
    """The largest rank (a multiple of RANK_STEP, at least `low`) that fits at `rows` sequences a unit."""
    if not shapes.hidden_layers:
        s = _int8(shapes, 0, rows, attention_rank)
        return s if _total(s, shapes) <= budget else None
    attention = attention_bytes(_int8(shapes, attention_rank=attention_rank), shapes)
    per_layer = (budget / (rows / shapes.sequences_per_unit) - shapes.attention_layers * attention) \
        / shapes.hidden_layers - 2
    rank = min(shapes.hidden_size, int(per_layer // RANK_STEP) * RANK_STEP)
    return _int8(shapes, rank, rows, attention_rank) if rank >= low else None


def fit(budget: float, shapes: Shapes) -> Settings:
    """The settings that store the chosen signals in `budget` bytes per token (see the ladder above)."""
    if not (shapes.hidden_layers or shapes.attention_layers):
        raise UserError("--signal-budget sizes hidden states and attention, and none are chosen: add "
                        "--hidden-layers or --attention-layers, or leave --signal-budget out")
    if _total(Settings(), shapes) <= budget:
        return Settings()
    per_unit = shapes.sequences_per_unit
    quarter = max(RANK_FLOOR, shapes.hidden_size // 4 // RANK_STEP * RANK_STEP)
    narrow = attention_quarter(shapes) if shapes.attention_layers else 0
    chosen = _widest(shapes, per_unit, budget, quarter)
    if chosen is None and narrow:
        chosen = _widest(shapes, per_unit, budget, quarter, narrow)
    if chosen is None:
        row = _total(_int8(shapes, quarter, per_unit, narrow), shapes) / per_unit  # one sequence a unit at quarters
        rows = min(per_unit, int(budget // row)) if row > 0 else 0
        chosen = _widest(shapes, rows, budget, quarter, narrow) if rows >= 1 else None
    if chosen is None:
        chosen = _widest(shapes, 1, budget, min(RANK_FLOOR, shapes.hidden_size), narrow)
    if chosen is None:
        least = math.ceil(_total(_int8(shapes, min(RANK_FLOOR, shapes.hidden_size), 1, narrow), shapes))
        heads = f", {narrow}-dimensional attention heads" if narrow else ""
        smallest = (f"int8, {min(RANK_FLOOR, shapes.hidden_size)}-dimensional hidden states{heads}, "
                    f"1 sequence of every {per_unit}")
        raise UserError(f"--signal-budget {budget:,.0f} B/token cannot hold the chosen hidden states and attention: "
                        f"the smallest setting ({smallest}) needs {least:,.0f} B/token: raise --signal-budget to at "
                        f"least {least:,.0f}B, choose fewer --hidden-layers / --attention-layers, or a larger "
                        f"--sequences-per-unit")
    return chosen


def from_flags(hidden_codec: str, hidden_rank: int, attention_codec: str, attention_dtype: str, fraction: float,
               shapes: Shapes, position_fraction: float = 1.0, attention_rank: int = 0) -> Settings:
    """The expert flags' settings (a rank implies int8), for signals that are chosen only."""
    if hidden_rank > shapes.hidden_size:
        raise UserError(f"--hidden-rank {hidden_rank} is more than the teacher's {shapes.hidden_size} hidden "
                        f"dimensions: lower it (0 keeps every channel)")
    if attention_rank > shapes.head_dim and shapes.attention_layers:
        raise UserError(f"--attention-rank {attention_rank} is more than the teacher's {shapes.head_dim} dimensions a "
                        f"head: lower it (0 keeps every dimension)")
    if attention_rank and shapes.attention_layers and shapes.attention_form != "factors":
        raise UserError("--attention-rank projects Q/K/V factors: use --attention-form factors, or leave it out")
    chosen = shapes.hidden_layers > 0 or shapes.attention_layers > 0
    positions = max(1, round(position_fraction * shapes.seq_len))
    if chosen and positions < shapes.seq_len and shapes.attention_form == "probs":
        raise UserError("--position-fraction keeps some positions, and attention stored as probabilities needs "
                        "every row's keys: use --attention-form factors, or leave --position-fraction at 1")
    rows = max(1, round(fraction * shapes.sequences_per_unit))
    hidden = shapes.hidden_layers > 0
    attention_rank = attention_rank if shapes.attention_layers and attention_rank < shapes.head_dim else 0
    return Settings("int8" if hidden and (hidden_rank or hidden_codec == "int8") else "float16",
                    hidden_rank if hidden and hidden_rank < shapes.hidden_size else 0,
                    "int8" if attention_rank else attention_codec if shapes.attention_layers else "float16",
                    attention_dtype, 0 if rows >= shapes.sequences_per_unit or not chosen else rows,
                    0 if positions >= shapes.seq_len or not chosen else positions, attention_rank)
