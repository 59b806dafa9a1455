"""The method registry: what a distillation method declares, and how methods are chosen from the CLI.

A method (GKD's shape) declares what the teacher must expose (signals and layers, checked against the
cache manifest before any training), what the student must expose (which of its layers to capture),
its hyper-parameters with defaults, any trainable parts of its own (it is an `nn.Module`), and a loss
over the batch and the student's outputs. A new method is one new file with a `@register` class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from kdpipe.errors import UserError
from kdpipe.stage2_distill.layermap import check_layer_map
from kdpipe.stage2_distill.methods import catalog
from kdpipe.storage.manifest import Manifest, TeacherInfo


@dataclass
class Batch:
    """One training batch read from the cache (teacher signals as float32 / int64 tensors)."""
    input_ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool: real tokens (what attention and intermediate-layer losses use)
    loss_mask: torch.Tensor | None = None  # [B, T] bool, chat data: the tokens a student learns (None: all)
    topk_ids: torch.Tensor | None = None  # [B, T, k]
    topk_logprobs: torch.Tensor | None = None  # [B, T, k], at T=1
    logsumexp: torch.Tensor | None = None  # [B, T, n_temps]
    logtail: torch.Tensor | None = None  # [B, T, n_temps]: log-mass outside the top-k (None: an older cache)
    sampled_ids: torch.Tensor | None = None  # [B, T, m]
    sampled_counts: torch.Tensor | None = None
    sampled_logprobs: torch.Tensor | None = None  # [B, T, m] at T=1 (None: an older cache)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> [B, T, H]
    factors: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # block -> post-RoPE (q, k, v)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> probs [B, h, T, T], either form
    # DIITO's interventions (storage.reader.TeacherCache.interchange) plus source_ids / source_length
    interchange: dict[str, torch.Tensor] = field(default_factory=dict)
    sequence_ids: torch.Tensor | None = None
    others: list["Batch"] = field(default_factory=list)  # the same rows from the 2nd, 3rd... --cache
    # a subsampled cache (storage.schema.signal_selection): the rows [b] that carry hidden states and attention,
    # which `hidden`, `factors` and `attention` then hold alone; None when every row does
    signal_rows: torch.Tensor | None = None
    # a position-subsampled cache (storage.schema.draw_positions): for each row of `hidden`, `factors` and
    # `attention`, the positions [b, P] they hold (their time axis); None when they hold every position
    signal_positions: torch.Tensor | None = None

    @property
    def layer_mask(self) -> torch.Tensor:
        """[b, T or P] bool: the real tokens among those `hidden`, `factors` and `attention` hold (what an
        intermediate-layer loss averages over: `mask`, or from a position-subsampled cache its signal positions)."""
        if self.signal_positions is None:
            return self.mask
        return self.mask.gather(1, self.signal_positions.to(self.mask.device))

    @property
    def targets(self) -> torch.Tensor:
        """[B, T] bool: the tokens a student learns to predict (the hard-label losses' mask: lm_loss shifts it)."""
        return self.mask if self.loss_mask is None else self.mask & self.loss_mask

    @property
    def predicts(self) -> torch.Tensor:
        """[B, T] bool: the positions whose next-token distribution a logit loss matches. Every real position
        for plain text; for chat, those whose next token is learned (the last one: if its own token is)."""
        if self.loss_mask is None:
            return self.mask
        following = torch.cat([self.loss_mask[:, 1:], self.loss_mask[:, -1:]], 1)
        return self.mask & following

    def teacher(self, i: int) -> "Batch":
        """Teacher i's signals for these rows (0: the first --cache)."""
        return self if i == 0 else self.others[i - 1]

    def signal_view(self) -> "Batch":
        """The rows that carry hidden states and attention, as a batch of their own (this batch when all do):
        what an intermediate-layer method sees of a subsampled cache, so that its loss averages over them."""
        return self if self.signal_rows is None else self._rows(self.signal_rows)

    def _rows(self, rows: torch.Tensor) -> "Batch":
        # hidden states and attention hold the signal rows alone already (or, from a cache that is not
        # subsampled, every row: those are picked too)
        layers = (lambda x: x) if self.signal_rows is not None else (lambda x: x[rows])  # noqa: E731
        per_row = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in self.__dict__.items()
                   if k not in ("hidden", "factors", "attention", "interchange", "others", "signal_rows",
                                "signal_positions")}
        positions = None if self.signal_positions is None else layers(self.signal_positions)
        return Batch(**per_row, signal_positions=positions, hidden={k: layers(v) for k, v in self.hidden.items()},
                     factors={k: tuple(layers(x) for x in v) for k, v in self.factors.items()},
                     attention={k: layers(v) for k, v in self.attention.items()},
                     interchange={k: v[rows] for k, v in self.interchange.items()},
                     others=[o._rows(rows) for o in self.others])

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()
                 if k not in ("hidden", "factors", "attention", "interchange", "others")}
        return Batch(**moved, hidden={k: v.to(device) for k, v in self.hidden.items()},
                     factors={k: tuple(x.to(device) for x in v) for k, v in self.factors.items()},
                     attention={k: v.to(device) for k, v in self.attention.items()},
                     interchange={k: v.to(device) for k, v in self.interchange.items()},
                     others=[other.to(device) for other in self.others])


@dataclass
class StudentOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # student layer -> [B, T, H_s]
    factors: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # student block -> (q, k, v)
    scaling: float | None = None  # the student's softmax scale of Q K^T
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)  # student block -> its own allowed keys
    softcaps: dict[int, float | None] = field(default_factory=dict)  # student block -> attention soft-capping
    # run(input_ids, mask, edits, hidden_layers) -> (logits, hidden): another student forward with hidden
    # states edited (see capture.Capture), for methods that intervene (Theseus, DIITO)
    run: Callable[..., tuple[torch.Tensor, dict[int, torch.Tensor]]] | None = None

    def at(self, positions: torch.Tensor | None) -> "StudentOutput":
        """These outputs' hidden states, factors and attention masks at the positions [B, P] a position-subsampled
        cache holds (all when None): the states the cache's teacher states pair with; logits stay whole."""
        if positions is None:
            return self
        from kdpipe.storage.attention import gather_time, key_mask

        t = self.logits.shape[1]
        masks = {}
        for block in self.factors:
            own = self.masks.get(block)
            own = key_mask(t, t, True, None, self.logits.device) if own is None else own
            masks[block] = gather_time(gather_time(own, positions, 2), positions, 3)
        hidden = {k: gather_time(v, positions, 1) for k, v in self.hidden.items()}
        factors = {k: tuple(gather_time(x, positions, 2) for x in v) for k, v in self.factors.items()}
        return StudentOutput(logits=self.logits, hidden=hidden, factors=factors, scaling=self.scaling, masks=masks,
                             softcaps=self.softcaps, run=self.run)

    def rows(self, rows: torch.Tensor | None) -> "StudentOutput":
        """These outputs for batch rows `rows` (all when None): see Batch.signal_view."""
        if rows is None:
            return self
        b = self.logits.shape[0]
        pick = lambda x: x[rows] if torch.is_tensor(x) and x.dim() and x.shape[0] == b else x  # noqa: E731
        return StudentOutput(logits=self.logits[rows], hidden={k: v[rows] for k, v in self.hidden.items()},
                             factors={k: tuple(x[rows] for x in v) for k, v in self.factors.items()},
                             scaling=self.scaling, masks={k: pick(v) for k, v in self.masks.items()},
                             softcaps=self.softcaps, run=self.run)


@dataclass
class Context:
    """What a method may know when it is built: the cache's teacher, the student, the run."""
    teacher: TeacherInfo
    temperatures: list[float]
    student_layers: int
    student_hidden: int
    total_steps: int
    student_pretrained: bool = False
    teacher_attention_scaling: float | None = None  # softmax scale of the teacher's Q K^T (from the manifest)
    teacher_windows: dict[int, int] = field(default_factory=dict)  # teacher block -> sliding window (0: causal)
    teacher_attention_softcap: float | None = None
    cached_hidden: list[int] = field(default_factory=list)  # teacher hidden layers the cache holds
    teachers: list[TeacherInfo] = field(default_factory=list)  # every --cache's teacher; [0] is `teacher`
    teacher_hidden: list[list[int]] = field(default_factory=list)  # hidden layers each cache holds
    teacher_temperatures: list[list[float]] = field(default_factory=list)  # temperatures each cache holds
    teacher_sample_temperatures: list[float] = field(default_factory=list)  # what each cache's draws were made at
    # per cache, teacher layer -> per-channel RMS of its hidden states over training sequences [H] (see scale_hidden)
    hidden_scales: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def teacher_mask(self, layer: int, t: int, device, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The allowed keys of teacher block `layer` over T tokens: causal, within its sliding window; over the
        positions [B, P] of a position-subsampled cache (Batch.signal_positions) when given."""
        from kdpipe.storage.attention import key_mask, positions_mask

        if positions is not None:
            return positions_mask(positions.to(device), self.teacher_windows.get(layer, 0))
        return key_mask(t, t, True, None, device, self.teacher_windows.get(layer, 0))

    def scale_hidden(self, x: torch.Tensor, layer: int, teacher: int = 0) -> torch.Tensor:
        """States in teacher `teacher`'s layer-`layer` space, each channel divided by that layer's RMS over the
        training data: a real decoder's few massive channels (|h| ~ 23,000 on SmolLM2) then weigh what every
        other channel does, instead of being the whole loss. Unchanged where no statistics were computed."""
        scales = self.hidden_scales[teacher] if teacher < len(self.hidden_scales) else {}
        scale = scales.get(layer)
        return x.float() if scale is None else x.float() / scale.to(x.device)

    def intermediate_hidden(self) -> list[int]:
        """The teacher's intermediate layers (1..L-1) the cache holds: what "all layers" methods use."""
        return [x for x in self.cached_hidden if 0 < x < self.teacher.num_layers]

    def __post_init__(self) -> None:
        self.teachers = self.teachers or [self.teacher]
        self.teacher_hidden = self.teacher_hidden or [list(self.cached_hidden)]
        self.teacher_temperatures = self.teacher_temperatures or [list(self.temperatures)]
        self.teacher_sample_temperatures = self.teacher_sample_temperatures or [1.0] * len(self.teachers)


@dataclass
class Needs:
    """Teacher signals a method reads from the cache."""
    topk: bool = False
    temperatures: list[float] = field(default_factory=list)
    sampled: bool = False
    sampled_at: list[float] = field(default_factory=list)  # temperatures at which the draws are weighted
    hidden: list[int] = field(default_factory=list)
    factors: list[int] = field(default_factory=list)  # blocks whose Q/K/V (attention form `factors`) are read
    attention: list[int] = field(default_factory=list)  # blocks whose attention probs are read (either form)
    interchange: list[int] = field(default_factory=list)  # DIITO: teacher layers it would intervene at (any will do)

    def missing(self, m: Manifest) -> list[str]:
        """The `kdpipe extract` flags that would add what the cache lacks (empty: all present)."""
        s, flags = m.signals, []
        temps = [t for t in self.temperatures if not any(abs(t - x) < 1e-9 for x in s.temperatures)]
        if temps:
            wanted = sorted(set(s.temperatures) | set(temps))
            stored = ", ".join(f"{t:g}" for t in s.temperatures)
            flags.append(f"--temperatures {','.join(f'{t:g}' for t in wanted)} (temperature "
                         f"{', '.join(f'{t:g}' for t in temps)} is not stored; stored: {stored})")
        if self.topk and not s.top_k:
            flags.append("--top-k 64 (the cache holds sampled logits only)")
        if self.sampled and not s.sample_count:
            flags.append("--sample-count 32")
        elif any(abs(t - s.sample_temperature) > 1e-9 for t in self.sampled_at) and not s.sampled_logprobs:
            flags.append(f"--sample-count {s.sample_count} without --no-sample-logprobs (the cache holds no "
                         f"log-probabilities of the drawn ids, which weight draws made at T={s.sample_temperature:g} "
                         f"for T={_listed(self.sampled_at)}: it was extracted with --no-sample-logprobs or by a "
                         f"kdpipe before 0.2)")
        hidden = sorted(set(self.hidden) - set(s.hidden_layers))
        if hidden:
            flags.append(f"--hidden-layers {','.join(str(x) for x in sorted(set(self.hidden) | set(s.hidden_layers)))}")
        if set(self.attention) - set(s.attention_layers):
            wanted = sorted(set(self.attention) | set(s.attention_layers))
            flags.append(f"--attention-layers {','.join(map(str, wanted))}")
        if self.interchange and not s.interchange_layers:
            flags.append(f"--interchange {','.join(map(str, self.interchange))}")
        have = set(s.attention_layers) if s.attention_form == "factors" else set()
        if set(self.factors) - have:
            wanted = sorted(set(self.factors) | have)
            flags.append(f"--attention-layers {','.join(map(str, wanted))} --attention-form factors")
        return flags


def _listed(values: list[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


class Method(nn.Module):
    """A distillation method. Those comparing hidden states have a `scale` setting: `channel` (their default)
    compares them with each channel divided by the teacher layer's RMS (Context.scale_hidden), `raw` as stored."""
    name: ClassVar[str]
    paper: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    adapted: ClassVar[str] = ""  # how the cache-only version differs from the paper, if it does
    choices: ClassVar[dict[str, tuple]] = {}  # word settings and their values, beyond base.CHOICES
    uncompared: ClassVar[tuple[str, ...]] = ()  # loss terms with no scale of their own (a policy gradient)
    topk_only: ClassVar[bool] = False  # reads the top-k beyond its soft loss: no importance-sampled cache
    # intermediate-layer methods are auxiliaries to an output loss: at 1 next to `kd` they took the small
    # student's capacity from the output on the methods bench (tinybert+kd ppl 486 against kd's 383; 375 at
    # 0.1). Alone, the weight scales the whole loss, which Adam's normalization nearly undoes.
    default_weight: ClassVar[float] = 1.0
    batch_rows: ClassVar[int] = 1  # the fewest rows its loss needs (contrastive: 2); see data.plan
    every_position: ClassVar[bool] = False  # its loss needs the teacher's states at every position (Theseus)

    def __init__(self, params: dict[str, Any], ctx: Context):
        super().__init__()
        self.params = {**self.defaults, **checked_params(type(self), params)}
        self.weight = float(params.get("weight", self.default_weight))
        self.ctx = ctx

    def hidden(self, x: torch.Tensor, layer: int, teacher: int = 0) -> torch.Tensor:
        """`x`, in teacher layer `layer`'s space, at the scale this method compares hidden states at."""
        return x.float() if self.params.get("scale") == "raw" else self.ctx.scale_hidden(x, layer, teacher)

    def needs(self) -> Needs:
        return Needs()

    def reads_layers(self, caches: int = 1) -> bool:
        """Whether this method reads hidden states or attention of any of `caches` teachers."""
        return any(n.hidden or n.factors or n.attention for n in map(self.teacher_needs, range(caches)))

    def teacher_needs(self, i: int) -> Needs:
        """What this method reads from the i-th --cache; single-teacher methods read the first only."""
        return self.needs() if i == 0 else Needs()

    def student_layers(self) -> list[int]:
        """Student hidden layers this method reads (same numbering as the cache's)."""
        return []

    def student_attention_layers(self) -> list[int]:
        """Student blocks whose post-RoPE Q/K/V this method reads."""
        return []

    def describe(self) -> str:
        """What this method reads, recorded in the run (methods that take whatever layers the cache
        holds say which they used)."""
        n = self.needs()
        parts = [f"{self.name} ({self.paper}), weight {self.weight:g}"]
        if n.hidden:
            parts.append(f"teacher hidden layers {n.hidden}")
        if n.factors or n.attention:
            parts.append(f"teacher attention blocks {sorted(set(n.factors) | set(n.attention))}")
        if self.student_layers() or self.student_attention_layers():
            parts.append(f"student layers {sorted(set(self.student_layers()) | set(self.student_attention_layers()))}")
        return "; ".join(parts)

    def loss(self, batch: Batch, out: StudentOutput, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class BlockPairMethod(Method):
    """A method between one teacher block's and one student block's Q/K/V (default: the last of each)."""
    defaults = {"teacher_layer": 0, "student_layer": 0}

    def block_pair(self) -> tuple[int, int]:
        return (int(self.params["teacher_layer"]) or self.ctx.teacher.num_layers,
                int(self.params["student_layer"]) or self.ctx.student_layers)

    def needs(self) -> Needs:
        return Needs(factors=[self.block_pair()[0]])

    def student_attention_layers(self) -> list[int]:
        return [self.block_pair()[1]]


def width_map(from_width: int, to_width: int, bias: bool = True) -> nn.Module:
    """A learned linear map between the student's and the teacher's widths; the identity when equal."""
    return nn.Identity() if from_width == to_width else nn.Linear(from_width, to_width, bias=bias)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# settings whose range is known by name: temperatures are positive, rates are fractions, words from a list
_POSITIVE = ("temperature", "max_temperature")
_FRACTIONS = ("drop_rate", "replace_rate", "phase1", "span_rate", "baseline_decay", "alpha")
CHOICES = {"estimator": ("bucket", "renorm", "sampled"), "pooling": ("mean", "last", "first"), "objective": ("lm", "kd"),
           "scale": ("channel", "raw")}


def checked_params(cls: type["Method"], params: dict[str, Any]) -> dict[str, Any]:
    """A method's settings, checked against its defaults: known names, the default's type, a sane range."""
    known = {"weight": cls.default_weight, **cls.defaults}
    out = {}
    for key, value in params.items():
        if key not in known:
            raise UserError(f"method {cls.name} has no setting {key!r} (it has: {', '.join(known)})")
        default = known[key]
        kind = type(default)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind in (int, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (kind is float or float(value).is_integer())
            value = kind(value) if ok else value
        else:
            ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
            value = str(value) if ok else value
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "a word")
            raise UserError(f"method {cls.name}: {key}={value!r} must be {what} (default {default!r})")
        if kind in (int, float) and (value < 0 or (key in _POSITIVE and value <= 0)
                                     or (key in _FRACTIONS and value > 1)):
            bound = "positive" if key in _POSITIVE else "in [0, 1]" if key in _FRACTIONS else "0 or more"
            raise UserError(f"method {cls.name}: {key}={value:g} must be {bound}")
        choices = {**CHOICES, **cls.choices}.get(key)
        if choices and value not in choices:
            raise UserError(f"method {cls.name}: {key}={value!r} is not one of {', '.join(choices)}")
        if key in ("layer_map", "strategy") and value != "final":
            check_layer_map(value)
        out[key] = value
    return out


def validate_specs(specs: list[str]) -> None:
    """Every --method names a method and sane settings: checked before any cache or model is read."""
    if not specs:
        raise UserError("no --method given: e.g. --method kd or --method kd:temperature=2 --method lm:weight=0.5")
    for spec in specs:
        name, params = parse_method(spec)
        if name not in METHODS:
            if name in catalog.RECIPES:
                raise UserError(f"{name} is not a loss but a recipe: {catalog.RECIPES[name]}")
            planned = catalog.status(name, METHODS)
            hint = f"{name} is {planned}" if planned else f"no method {name!r}"
            raise UserError(f"{hint}: `kdpipe methods` lists the methods available")
        checked_params(METHODS[name], params)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """'kd:weight=1,temperature=2' -> ('kd', {'weight': 1, 'temperature': 2})."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    params: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"bad method setting {item!r} in {spec!r}: use name:key=value,key=value")
        params[key.strip().replace("-", "_")] = _value(value.strip())
    return name, params


def build_methods(specs: list[str], ctx: Context) -> list[Method]:
    validate_specs(specs)
    return [METHODS[name](params, ctx) for name, params in map(parse_method, specs)]


def check_needs(methods: list[Method], manifest: Manifest, cache_path: str, index: int = 0) -> None:
    """Before the first step: every method's teacher signals must be in the cache."""
    for method in methods:
        if method.every_position and manifest.position_subsampled and method.teacher_needs(index).hidden:
            raise UserError(f"method {method.name} replaces the student's states at every position with the "
                            f"teacher's, and {cache_path} holds them at {manifest.signal_positions} of every "
                            f"{manifest.data.seq_len} positions: re-extract without --position-fraction (or with a "
                            f"--signal-budget that keeps every position)")
        needs = method.teacher_needs(index)
        missing = needs.missing(manifest)
        s = manifest.signals
        if (not s.top_k and s.sample_count and needs.topk and "estimator" in method.params
                and method.params["estimator"] != "sampled"):
            # the draws serve this method as they are: the fix is a parameter, not a second extraction
            raise UserError(f"method {method.name} (estimator {method.params['estimator']}) reads top-k logits, "
                            f"and {cache_path} is an importance-sampled cache (--top-k 0, {s.sample_count} "
                            f"draws): use {method.name}:estimator=sampled, or re-extract with `kdpipe extract "
                            f"{' '.join(missing)} ...`")
        if missing:
            raise UserError(f"method {method.name} needs teacher signals that {cache_path} lacks: re-extract with "
                            f"`kdpipe extract {' '.join(missing)} ...` (same --teacher and --data)")
