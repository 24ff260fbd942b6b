"""Typed dataclass configs on the command line: `--help` from field docstrings, `--config FILE.yaml`.

Precedence: dataclass defaults, then the YAML file (overrides only), then command-line flags.
Unknown YAML keys and bad values fail at once, naming the field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from core.errors import ConfigError
from core.logs import setup_logging

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or fail naming the field."""
    inner, optional = _unwrap_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(name, value, f"a value of type {getattr(inner, '__name__', inner)} is required")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ConfigError(name, value, f"must be one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_type,) = get_args(inner) or (str,)
        values = value if isinstance(value, list) else [value]
        items = [v for one in values for v in (str(one).split(",") if isinstance(one, str) else [one]) if v != ""]
        return [_coerce(name, item_type, item) for item in items]
    if origin is dict or inner is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(name, value, "must be a mapping")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, value, "must be true or false")
    if inner in (int, float, str):
        try:
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return inner(value)
        except (TypeError, ValueError):
            raise ConfigError(name, value, f"must be of type {inner.__name__}") from None
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of overrides; flags given here win over it")
    docs = field_docs(cls)
    hints = _hints(cls)
    for spec in dataclasses.fields(cls):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not dataclasses.MISSING else None
        if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = spec.default_factory()  # type: ignore[misc]
        inner, _ = _unwrap_optional(hints[spec.name])
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS}
        help_text = docs.get(spec.name, "")
        if default not in (None, "", [], {}):
            help_text += f" (default: {default})"
        kwargs["help"] = help_text.replace("%", "%%")
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(inner) is Literal:
            kwargs["choices"] = list(get_args(inner))
        elif get_origin(inner) is list:
            kwargs["nargs"] = "+"  # `--models a b c`; commas also split (`--shots 0,5`)
        parser.add_argument(flag, **kwargs)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def from_mapping(cls: type[T], values: dict[str, Any], origin: str = "config") -> T:
    """Build a config dataclass from a mapping, coercing types and rejecting unknown keys."""
    hints = _hints(cls)
    names = {spec.name for spec in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(unknown[0], values[unknown[0]], f"unknown key in {origin}; known: {', '.join(sorted(names))}")
    coerced = {name: _coerce(name, hints[name], value) for name, value in values.items()}
    missing = [
        spec.name
        for spec in dataclasses.fields(cls)
        if spec.default is dataclasses.MISSING
        and spec.default_factory is dataclasses.MISSING  # type: ignore[misc]
        and spec.name not in coerced
    ]
    if missing:
        flag = "--" + missing[0].replace("_", "-")
        raise ConfigError(missing[0], None, f"is required: pass {flag} or set it in --config")
    return cls(**coerced)


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError("config", path, "no such file; pass the path of a YAML file of overrides")
    values = yaml.safe_load(file.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError("config", path, "must hold a mapping of field: value")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def parse(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `argv` into `cls`. A ConfigError exits with status 2 and the message, before any work."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    values = load_yaml(config_file) if config_file else {}
    values.update(args)
    try:
        return from_mapping(cls, values, origin=config_file or "config")
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: config error: {error}\n")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def run_job(cls: type[T], run: typing.Callable[[T], Any], argv: list[str] | None, description: str | None) -> Any:
    """Parse, log the config, run. A ConfigError (before or during the run) exits 2 with its message."""
    setup_logging()
    config = parse(cls, argv, description)
    logging.getLogger("finescope").info("config: %s", json.dumps(to_dict(config), default=str, sort_keys=True))
    try:
        return run(config)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
