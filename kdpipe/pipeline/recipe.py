"""`kdpipe run recipe.toml`: a pipeline of named extract / distill / eval steps.

A step is a `[steps.NAME]` table with `kind` and the same settings as that command's flags. `${other}`
in a value is the output directory of step `other` (and makes this step depend on it), `${vars.x}`
a variable from `[vars]` or `--var x=...`. Each step's output directory is keyed by a hash of its
kind, its settings (with references resolved, so a changed upstream step changes every step below
it) and the size and modification time of the input files it names. A step whose directory holds a
completion marker with that hash is skipped; a step that failed left no marker and runs again
(resuming what it had written). `--only NAME` runs one step whose dependencies are done.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.errors import UserError
from kdpipe.jsonfile import read_json, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KINDS = ("extract", "distill", "eval")
MARKER = "kdpipe-step.json"
REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # becomes a directory name: never a path


@dataclass
class Step:
    name: str
    kind: str
    settings: dict[str, Any]
    needs: list[str] = field(default_factory=list)


@dataclass
class StepResult:
    name: str
    kind: str
    status: str  # ran | skipped
    out: Path
    record: dict[str, Any]


def _references(value: Any) -> set[str]:
    if isinstance(value, str):
        return {r for r in REFERENCE.findall(value) if not r.startswith("vars.")}
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    return set()


def load_recipe(path: str, overrides: dict[str, str], workdir: str | None = None,
                trust_remote_code: bool = False) -> tuple[list[Step], dict[str, str], Path]:
    """Steps in dependency order, the variables, and the work directory."""
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from None
    if not isinstance(raw.get("vars", {}), dict) or not isinstance(raw.get("run", {}), dict):
        raise UserError(f"recipe {path}: [vars] and [run] must be tables (vars.x = ..., or a [vars] section)")
    variables = {k: str(v) for k, v in raw.get("vars", {}).items()} | overrides
    base = file.parent.resolve()
    chosen = Path(workdir) if workdir else Path(str(raw.get("run", {}).get("workdir", f"runs/{file.stem}")))
    workdir = chosen.resolve() if workdir else (chosen if chosen.is_absolute() else base / chosen)
    tables = raw.get("steps")
    if not isinstance(tables, dict) or not tables:
        raise UserError(f"recipe {path} has no [steps.NAME] tables")
    steps = {}
    for name, table in tables.items():
        if not STEP_NAME.match(name):
            raise UserError(f"recipe step name {name!r} is not allowed: use letters, digits, - and _ (it names the "
                            f"step's output directory)")
        kind = table.get("kind") if isinstance(table, dict) else None
        if kind not in KINDS:
            raise UserError(f"recipe step {name!r} needs kind = one of {', '.join(KINDS)}")
        settings = {k.replace("-", "_"): v for k, v in table.items() if k not in ("kind", "after")}
        if settings.get("trust_remote_code") and not trust_remote_code:
            raise UserError(f"recipe step {name!r} sets trust_remote_code, which runs the model's own Python code: "
                            f"run the recipe with `kdpipe run --trust-remote-code` if you trust it")
        after = table.get("after", [])
        after = [after] if isinstance(after, str) else after
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise UserError(f"recipe step {name!r}: after must name steps, e.g. after = [\"teacher\"]")
        needs = sorted(_references(list(settings.values())) | set(after))
        unknown = [n for n in needs if n not in tables]
        if unknown:
            raise UserError(f"recipe step {name!r} refers to {unknown[0]!r}, which is not a step")
        steps[name] = Step(name, kind, settings, needs)
    return _ordered(steps), variables, workdir


def _ordered(steps: dict[str, Step]) -> list[Step]:
    order, state = [], {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise UserError(f"recipe steps depend on each other in a cycle: {' -> '.join(trail + [name])}")
        state[name] = "visiting"
        for dep in steps[name].needs:
            visit(dep, trail + [name])
        state[name] = "done"
        order.append(steps[name])

    for name in steps:
        visit(name, [])
    return order


def _substitute(value: Any, outputs: dict[str, Path], variables: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_substitute(v, outputs, variables) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        key = match.group(1)
        if key.startswith("vars."):
            if key[5:] not in variables:
                raise UserError(f"recipe variable {key[5:]!r} is not set: add it to [vars] or pass --var {key[5:]}=...")
            return variables[key[5:]]
        return str(outputs[key])

    return REFERENCE.sub(one, value)


def _stamp(value: Any, workdir: Path) -> list:
    """Size and mtime of the existing input files a value names (outputs of steps are keyed already)."""
    stamps = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, str) or not item:
            continue
        path = Path(item)
        if not path.exists() or workdir in path.resolve().parents:
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:10000]
        stamps += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return stamps


def _run_step(step: Step, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    from kdpipe.pipeline.commands import run_distill, run_eval, run_extract

    settings = dict(settings)
    if "out" in settings or "config" in settings:
        raise UserError(f"recipe step {step.name!r}: `out` and `config` are not step settings (kdpipe names the "
                        f"step's output directory)")
    started = time.perf_counter()
    try:
        if step.kind == "eval":
            record = run_eval(settings)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps(record, indent=2))
        else:
            settings["out"] = str(out)
            if out.exists() and any(out.iterdir()):  # what a failed attempt wrote is resumed, not redone
                settings["resume"] = True
            if step.kind == "extract":
                done = run_extract(settings)
                record = {"tokens": done.manifest.data.num_tokens, "tokens_per_s": done.tokens_per_second}
            else:
                done = run_distill(settings)
                record = {**done.final, "tokens_per_s": done.tokens_per_second}
    except UserError as exc:
        raise UserError(f"recipe step {step.name!r}: {exc}") from None
    return record | {"seconds": time.perf_counter() - started}


def run_recipe(path: str, overrides: dict[str, str], only: str | None = None, force: bool = False,
               echo=print, workdir: str | None = None, trust_remote_code: bool = False) -> list[StepResult]:
    steps, variables, workdir = load_recipe(path, overrides, workdir, trust_remote_code)
    base = Path(path).parent.resolve()
    if only is not None and only not in {s.name for s in steps}:
        raise UserError(f"recipe {path} has no step {only!r} (steps: {', '.join(s.name for s in steps)})")
    needed = _dependencies(steps, only) if only is not None else set()
    outputs: dict[str, Path] = {}
    hashes: dict[str, str] = {}
    results = []
    for step in steps:
        settings = {k: _resolve_path(_substitute(v, outputs, variables), base) for k, v in step.settings.items()}
        key = json.dumps({"kind": step.kind, "settings": settings, "needs": {n: hashes[n] for n in step.needs},
                          "inputs": [_stamp(v, workdir) for v in settings.values()]}, sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()
        out = workdir / f"{step.name}-{digest[:12]}"
        outputs[step.name], hashes[step.name] = out, digest
        marker = out / MARKER
        previous = read_json(marker)
        previous = previous if isinstance(previous, dict) and isinstance(previous.get("record"), dict) else {}
        done = previous.get("hash") == digest
        if only is not None and step.name != only:
            if not done and step.name in needed:
                raise UserError(f"step {only!r} needs {step.name!r}, which is not done: run the recipe without --only")
            continue
        if done and not force:
            results.append(StepResult(step.name, step.kind, "skipped", out, previous["record"]))
            echo(f"[{step.name}] unchanged, skipped ({out.name})")
            continue
        echo(f"[{step.name}] {step.kind} -> {out}")
        if done or (force and out.exists()):  # --force recomputes; the earlier result is kept beside it
            kept = out.with_name(f"{out.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(kept)
            echo(f"[{step.name}] --force: the earlier output is kept as {kept.name}")
        record = _run_step(step, settings, out)
        write_json(marker, {"hash": digest, "kind": step.kind, "settings": settings, "record": record})
        results.append(StepResult(step.name, step.kind, "ran", out, record))
    return results


def _dependencies(steps: list[Step], name: str) -> set[str]:
    """Every step that `name` needs, directly or through others."""
    by_name = {s.name: s for s in steps}
    found, todo = set(), list(by_name[name].needs)
    while todo:
        dep = todo.pop()
        if dep not in found:
            found.add(dep)
            todo += by_name[dep].needs
    return found


def _resolve_path(value: Any, base: Path) -> Any:
    """Relative paths in a recipe are relative to the recipe file."""
    if isinstance(value, list):
        return [_resolve_path(v, base) for v in value]
    if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
        return str(base / value)
    return value


def table(results: list[StepResult]) -> str:
    """The results of the distill and eval steps, one row each."""
    cols = ["step", "kind", "status", "seconds", "tokens/s", "held-out CE", "KL to teacher", "top-1 agree"]
    rows = []
    for r in results:
        rec = r.record
        rows.append([r.name, r.kind, r.status, f"{rec.get('seconds', 0):.1f}",
                     f"{rec['tokens_per_s']:.0f}" if rec.get("tokens_per_s") else "",
                     f"{rec['eval/ce']:.4f}" if "eval/ce" in rec else "",
                     f"{rec['eval/kl_teacher']:.4f}" if "eval/kl_teacher" in rec else "",
                     f"{rec['eval/top1_agreement']:.1%}" if "eval/top1_agreement" in rec else ""])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
