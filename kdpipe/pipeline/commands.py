"""The commands a user runs, from settings named as their flags: the CLI calls these with what click
parsed, a recipe step with what its TOML table says. Values are checked and converted to the types the
stages take here, so a recipe's `seq_len = "abc"` is one clear error, like the flag's."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from kdpipe.console import say
from kdpipe.errors import UserError


def coerce(cls: type, settings: dict[str, Any], command: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`settings` (flag names, `-` or `_`) as the keyword arguments of the dataclass `cls`, typed by its
    annotations (and `extra`'s: names the command takes beyond the dataclass)."""
    hints = {**typing.get_type_hints(cls), **(extra or {})}
    fields = {f.name for f in dataclasses.fields(cls)} | set(extra or {})
    out = {}
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise UserError(f"unknown setting {key!r} for `kdpipe {command}`")
        out[name] = _convert(value, hints[name], f"{key}={value!r} for `kdpipe {command}`")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in out
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"`kdpipe {command}` needs the setting {missing[0]!r}")
    return out


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"setting {where} must be true or false")
    if hint in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if not isinstance(number, (int, float)) or (hint is int and not float(number).is_integer()):
                raise ValueError
            return hint(number)
        except (ValueError, TypeError, OverflowError):
            raise UserError(f"setting {where} must be {'an integer' if hint is int else 'a number'}") from None
    if origin is list:
        items = value if isinstance(value, list) else \
            [v for v in str(value).split(",") if v.strip()] if args[0] in (int, float) else [value]
        return [_convert(v, args[0], where) for v in items]
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"setting {where} must be a string")
    return value


def run_extract(settings: dict[str, Any]):
    from kdpipe.stage1_extract.extractor import ExtractConfig, extract

    if isinstance(settings.get("signal_budget"), str):  # "8KB"
        from kdpipe.pipeline.plan import parse_size

        settings = {**settings, "signal_budget": parse_size(settings["signal_budget"])}
    opts = coerce(ExtractConfig, settings, "extract", {"for_methods": str | None, "student_layers": int | None})
    for_methods, student_layers = opts.pop("for_methods", None), opts.pop("student_layers", None)
    if for_methods:
        from kdpipe.pipeline.for_methods import signals_for_methods

        if student_layers is None:
            raise UserError("--for-methods needs --student-layers N (the layer mapping depends on it)")
        chosen = signals_for_methods([m for m in for_methods.split(",") if m], opts["teacher"], student_layers,
                                     opts.get("trust_remote_code", False))
        temperatures = opts.get("temperatures", ExtractConfig.__dataclass_fields__["temperatures"].default_factory())
        chosen["temperatures"] = sorted(set(chosen["temperatures"]) | set(temperatures))
        chosen["sample_count"] = max(chosen["sample_count"], opts.get("sample_count", 0))
        if chosen["interchange_layers"] == "none":  # keep an explicit --interchange
            chosen.pop("interchange_layers")
        opts.update(chosen)
        say(f"for {for_methods} with {student_layers}-layer students: hidden layers {chosen['hidden_layers']}, "
            f"attention {chosen['attention_form']} of {chosen['attention_layers']}, temperatures "
            f"{','.join(f'{t:g}' for t in chosen['temperatures'])}"
            + (f", interchange at {chosen['interchange_layers']}" if "interchange_layers" in chosen else ""))
    return extract(ExtractConfig(**opts))


def run_distill(settings: dict[str, Any]):
    from kdpipe.stage2_distill.trainer import DistillConfig, distill

    return distill(DistillConfig(**coerce(DistillConfig, settings, "distill")))


@dataclasses.dataclass
class EvalConfig:
    student: str
    cache: str
    run_dir: str | None = None
    max_sequences: int | None = None
    batch_size: int = 8
    device: str = "cpu"


def run_eval(settings: dict[str, Any]) -> dict[str, float]:
    from kdpipe.stage2_distill.evaluate import evaluate_model

    settings = {("run_dir" if k == "run" else k): v for k, v in settings.items() if k not in ("json", "as_json")}
    cfg = EvalConfig(**coerce(EvalConfig, settings, "eval"))
    return evaluate_model(cfg.student, cfg.cache, cfg.run_dir, cfg.max_sequences, cfg.batch_size, cfg.device)
