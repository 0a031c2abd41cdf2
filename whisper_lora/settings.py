"""Options as dataclass fields, read from YAML files and command lines by one set of rules.

Every stage's config (config.py) and the augmentation file (augment.py) are dataclasses whose fields are
declared with `option()`; `read_value` turns what YAML or argparse gave into the field's type:
  - a YAML value mostly arrives typed, but PyYAML reads `1e-4` as text, and people quote numbers: text
    is parsed the way a command line's is. A boolean is never a number (YAML reads `yes` as true, which
    must not become 1);
  - a command-line value arrives as text and is parsed (`--lora-r 8`, `--temperature 0,0.2`).
  - a list may be given as one comma-separated text (`target_modules: q_proj,v_proj`).
Errors name the option and the value, on one line.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from .errors import UserError

TRUE = ("true", "yes", "1", "on")
FALSE = ("false", "no", "0", "off")


def option(default: Any = None, help: str = "", *, choices: tuple | None = None, positional: bool = False,
           short: str | None = None):
    """A field with its default, help text and (optionally) its choices, declared once."""
    metadata = {"help": help, "choices": choices, "positional": positional, "short": short}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def read_value(value: Any, annotation: Any, where: str) -> Any:
    """`value`, from YAML or a command line, as the type `annotation` names."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return read_value(value, inner[0], where)
    if origin in (list, tuple):
        item = typing.get_args(annotation)[0]
        given = value if isinstance(value, (list, tuple)) else [value]
        items = [piece.strip() for v in given for piece in v.split(",")] if all(isinstance(v, str) for v in given) \
            else given
        read = [read_value(v, item, where) for v in items]
        return read if origin is list else tuple(read)

    def refuse():
        kind = {int: "int", float: "float", bool: "true or false", str: "text"}.get(annotation, annotation)
        raise UserError(f"{where}: cannot read {value!r} as {kind}")

    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in TRUE + FALSE:
            return str(value).strip().lower() in TRUE
        refuse()
    if annotation in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value) if annotation is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                refuse()
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            refuse()  # YAML's `yes` is true, not 1
        if not math.isfinite(number):
            raise UserError(f"{where}: must be finite, got {value!r}")
        if annotation is int:
            if not float(number).is_integer():
                refuse()
            return int(number)
        return float(number)
    if annotation is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            refuse()
        return str(value)  # YAML reads `run_name: 2024` as a number
    raise TypeError(f"unsupported option type {annotation!r}")  # a bug in a config class, not user input


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file that must hold a mapping; a missing file, bad YAML or another shape is a one-line error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found", path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"invalid YAML{f' at line {mark.line + 1}' if mark else ''}", path) from None
    except UnicodeDecodeError:
        raise UserError(f"{what} is not UTF-8 text", path) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{what} must be a mapping of name: value", path)
    return loaded
