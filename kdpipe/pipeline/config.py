"""`--config FILE.toml`: the same names as the flags; flags given on the command line win."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kdpipe.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_toml(path: str, command: click.Command, section: str | None = None) -> dict:
    """The file's settings for `command`, keyed by parameter name, checked against its flags."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    if section and isinstance(raw.get(section), dict):
        raw = raw[section]
    known = {p.name for p in command.params}
    settings = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known or name == "config":
            raise UserError(f"config file {path}: unknown setting {key!r} for `kdpipe {command.name}`")
        param = next(p for p in command.params if p.name == name)
        if getattr(param, "multiple", False) and not isinstance(value, list):
            value = [value]
        if isinstance(value, list) and not getattr(param, "multiple", False):
            value = ",".join(str(v) for v in value)
        settings[name] = value
    return settings


def config_option(section: str):
    """A click option that reads a TOML file into the command's defaults before other options are parsed."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value:
            ctx.default_map = {**(ctx.default_map or {}), **load_toml(value, ctx.command, section)}
        return value

    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=callback, help=f"TOML file with the same settings as the flags (table [{section}] "
                                                f"or top level); flags win.")
