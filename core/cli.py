"""Typed dataclass configs on the command line: `--help` from field docstrings, `--config FILE.yaml`.

Precedence: dataclass defaults, then the YAML file (overrides only), then command-line flags.
Any configuration mistake (an unreadable or malformed file, a duplicate or unknown key, a value of the wrong
type, a flag argparse refuses, a ConfigError raised later by the stage) ends the job with status 2 and
one line that names the field, the value and the fix (docs/design.md, "Config validation").
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import logging
import numbers
import os
import sys
import textwrap
import types
import typing
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, get_args, get_origin

import yaml

from core.errors import ConfigError
from core.logs import setup_logging

T = TypeVar("T")

logger = logging.getLogger(__name__)

_NONE_WORDS = ("none", "null")


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


# --- types: what a field accepts --------------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _type_name(annotation: Any) -> str:
    """A type as the config's annotation writes it: int, float, list[str], dict."""
    if get_origin(annotation) is None:
        return getattr(annotation, "__name__", str(annotation))
    return str(annotation).replace("typing.", "")


def _kind(value: Any) -> str:
    """A value's type name, as `_type_name` writes types: a YAML list is a list, a YAML mapping a dict."""
    return type(value).__name__


def _wrong_type(name: str, value: Any, annotation: Any) -> ConfigError:
    fix = f"must be of type {_type_name(annotation)}, not {_kind(value)}"
    if annotation in (int, float) and isinstance(value, str):
        fix += ": write the number without quotes"
        if "e" in value.lower():  # YAML 1.1 reads 1e6 (no dot, no sign) as text, not as a number
            fix += " and without an exponent (YAML reads 1e6 as text: write 1000000)"
    elif annotation is str and isinstance(value, numbers.Number):
        fix += ": put it in quotes"
    return ConfigError(name, value, fix)


def _check_scalar(name: str, annotation: Any, value: Any) -> Any:
    """A YAML or mapping value for an int, float, bool or str field: kept when its type fits, else refused."""
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, value, f"must be of type bool (true or false), not {_kind(value)}")
    if isinstance(value, bool):  # a bool is an int to Python, never a count or a rate to a config
        raise _wrong_type(name, value, annotation)
    if annotation is int and isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)  # 5 and 5.0 alike; YAML needs the float form for large numbers (1.0e+6)
    if annotation is float and isinstance(value, numbers.Real):
        return float(value)  # NaN and infinities pass here and meet the field's range check
    if annotation is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if annotation is int and isinstance(value, numbers.Real):
        raise ConfigError(name, value, "must be of type int: a whole number")
    raise _wrong_type(name, value, annotation)


def _check_list(name: str, annotation: Any, value: Any) -> list[Any]:
    """A list field takes a list, or one item; a string is split at commas, as on the command line."""
    (item_type,) = get_args(annotation) or (str,)
    if isinstance(value, Mapping):
        raise _wrong_type(name, value, annotation)
    if isinstance(value, str):
        value = [part for part in value.split(",") if part != ""]
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_check(f"{name}[{index}]", item_type, item) for index, item in enumerate(items)]


def _check_mapping(name: str, annotation: Any, value: Any) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise _wrong_type(name, value, annotation)
    key_type, value_type = get_args(annotation) or (Any, Any)
    return {
        _check(f"{name}.{key}", key_type, key): _check(f"{name}.{key}", value_type, item) for key, item in value.items()
    }


def _check_union(name: str, annotation: Any, value: Any) -> Any:
    """A union other than `X | None` (`str | list[str]`, say): the first member that takes the value."""
    members = get_args(annotation)
    if value is None and type(None) in members:
        return None
    for member in members:
        try:
            return _check(name, member, value)
        except ConfigError:
            continue
    raise _wrong_type(name, value, annotation)


def _check(name: str, annotation: Any, value: Any) -> Any:
    """A YAML or mapping value converted to the field's type, or a ConfigError naming field, value and type."""
    inner, optional = _unwrap_optional(annotation)
    if value is None:
        if optional or inner is Any:
            return None
        raise ConfigError(name, value, f"a value of type {_type_name(inner)} is required")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if not any(type(value) is type(choice) and value == choice for choice in choices):
            raise ConfigError(name, value, f"must be one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _check_union(name, inner, value)
    if origin is list:
        return _check_list(name, inner, value)
    if origin is dict or inner is dict:
        return _check_mapping(name, inner, value)
    if inner in (bool, int, float, str):
        return _check_scalar(name, inner, value)
    return value


def _from_flag(name: str, annotation: Any, raw: Any) -> Any:
    """A command-line argument (text, a list of texts, or a bool from --x/--no-x) in the field's type.

    Text is read as the field's type here (`--top-n 5`, `--shots 0,5`, `--lr none`); `_check` then holds
    the result to the same rules as a YAML value."""
    inner, optional = _unwrap_optional(annotation)
    if optional and isinstance(raw, str) and raw.lower() in _NONE_WORDS:
        return None
    if get_origin(inner) is list:
        (item_type,) = get_args(inner) or (str,)
        texts = raw if isinstance(raw, list) else [raw]
        parts = [part for text in texts for part in str(text).split(",") if part != ""]
        return [_from_flag(name, item_type, part) for part in parts]
    if not isinstance(raw, str):
        return raw
    if get_origin(inner) is dict or inner is dict:
        try:
            return json.loads(raw)
        except ValueError:
            raise ConfigError(name, raw, 'must be a JSON object, e.g. \'{"dtype": "bfloat16"}\'') from None
    if inner in (int, float):
        try:
            return inner(raw)
        except ValueError:
            raise ConfigError(name, raw, f"must be of type {inner.__name__}") from None
    return raw


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# --- YAML -------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that a mapping repeats (PyYAML keeps the last one silently)."""

    source = "the YAML file"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class refuses it with its own message
            line = key_node.start_mark.line + 1
            if key in lines:
                value = self.construct_object(value_node, deep=True)
                raise ConfigError(
                    str(key), value, f"is set twice in {self.source}, at lines {lines[key]} and {line}; keep one"
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, path: str, flag: str) -> Any:
    loader = _StrictLoader(text)
    loader.source = path
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = ", ".join(part for part in (error.context, error.problem) if part)
        raise ConfigError(flag, path, f"is not valid YAML{where}: {problem}; fix the file there") from None
    except yaml.YAMLError as error:
        raise ConfigError(flag, path, f"is not valid YAML: {' '.join(str(error).split())}") from None
    finally:
        loader.dispose()


def load_yaml(path: str, flag: str = "--config") -> dict[str, Any]:
    """The mapping a YAML file holds, its dashed keys written with underscores; a mistake names `flag`."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(flag, path, "no such file; pass the path of a YAML file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise ConfigError(flag, path, f"cannot be read ({reason}); pass a readable UTF-8 YAML file") from None
    values = _parse_yaml(text, path, flag)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(flag, path, f"must hold a mapping of field: value, not a {_kind(values)}")
    normalised: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in normalised:
            raise ConfigError(name, value, f"is set twice in {path}, as {spelled[name]} and {key}; keep one")
        normalised[name], spelled[name] = value, str(key)
    return normalised


# --- building a config ------------------------------------------------------------------------------------


def _unknown_key(key: str, names: set[str], origin: str) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), sorted(names), n=1, cutoff=0.75)
    if close:
        return f"unknown key in {origin}; did you mean {close[0]}?"
    return f"unknown key in {origin}; known: {', '.join(sorted(names))}"


def from_mapping(cls: type[T], values: dict[str, Any], origin: str = "config") -> T:
    """Build a config dataclass from a mapping (YAML, a spec's section), refusing unknown keys and wrong types.

    Values keep their types: a list for a `str` field, a bool for a number, a string for a number and a
    mapping for a scalar are refused, naming the field, the value and the type it needs.
    """
    hints = _hints(cls)
    names = {spec.name for spec in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(unknown[0], values[unknown[0]], _unknown_key(unknown[0], names, origin))
    checked = {name: _check(name, hints[name], value) for name, value in values.items()}
    missing = [
        spec.name
        for spec in dataclasses.fields(cls)
        if spec.default is dataclasses.MISSING
        and spec.default_factory is dataclasses.MISSING  # type: ignore[misc]
        and spec.name not in checked
    ]
    if missing:
        flag = "--" + missing[0].replace("_", "-")
        raise ConfigError(missing[0], None, f"is required: pass {flag} or set it in --config")
    return cls(**checked)


# --- the command line -------------------------------------------------------------------------------------


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, with the nearest flag for a mistyped one."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._nearest_flag(message)} (--help lists the flags)\n")

    def _nearest_flag(self, message: str) -> str:
        """`; did you mean --seeds?` for an unrecognized flag that is close to a real one."""
        if not message.startswith("unrecognized arguments"):
            return ""
        flags = [option for action in self._actions for option in action.option_strings]
        for word in message.split(": ", 1)[-1].split():
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.75)
            if word.startswith("--") and close:
                return f"; did you mean {close[0]}?"
        return ""


def _flag_help(spec: dataclasses.Field, docs: dict[str, str], required: bool) -> str:
    default = spec.default if spec.default is not dataclasses.MISSING else None
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = spec.default_factory()  # type: ignore[misc]
    help_text = docs.get(spec.name, "")
    if required:
        help_text += " (required)"
    elif default not in (None, "", [], {}):
        help_text += f" (default: {default})"
    return help_text.replace("%", "%%")


TEST_ONLY = "test_only"
"""Field metadata key: `field(default=..., metadata={TEST_ONLY: True})` marks a hook for the tests, which the
command line takes but --help does not show."""


def _add_flag(group: Any, spec: dataclasses.Field, annotation: Any, help_text: str) -> argparse.Action:
    inner, _ = _unwrap_optional(annotation)
    shown = argparse.SUPPRESS if spec.metadata.get(TEST_ONLY) else help_text
    kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": shown}
    if inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(inner) is Literal:
        kwargs["choices"] = list(get_args(inner))
    elif get_origin(inner) is list:
        kwargs["nargs"] = "+"  # `--models a b c`; commas also split (`--shots 0,5`)
    return group.add_argument("--" + spec.name.replace("_", "-"), **kwargs)


def build_parser(
    cls: type,
    description: str | None = None,
    prog: str | None = None,
    required: tuple[str, ...] | list[str] = (),
    config_file: bool = True,
) -> argparse.ArgumentParser:
    """A parser with one flag per field of `cls`. `required` fields lead the usage line and have a heading of
    their own; they may come from --config instead, so argparse does not insist on them (the config does).
    `config_file` False leaves --config out: a job whose one input file is a spec takes it as --spec."""
    parser = OneLineArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    heading = "required (as flags, or as keys of --config)" if config_file else "required"
    must = parser.add_argument_group(heading) if required else parser
    if config_file:
        parser.add_argument("--config", help="YAML file of overrides; flags given here win over it")
    docs, hints = field_docs(cls), _hints(cls)
    shown = []
    for spec in dataclasses.fields(cls):
        is_required = spec.name in required
        action = _add_flag(must if is_required else parser, spec, hints[spec.name], _flag_help(spec, docs, is_required))
        if is_required:
            shown.append(_usage(action))
    if shown:  # the required flags, then the rest in one word: argparse would list all ~30 flags
        parser.usage = f"%(prog)s {' '.join(shown)}{' [--config CONFIG]' if config_file else ''} [options]"
    return parser


def _usage(action: argparse.Action) -> str:
    """A flag as a usage line shows it: `--corpus CORPUS [CORPUS ...]`, `--rule {a,b}`."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return flag
    metavar = "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    return f"{flag} {metavar} [{metavar} ...]" if action.nargs == "+" else f"{flag} {metavar}"


def _config_from_args(cls: type[T], args: dict[str, Any]) -> T:
    config_file = args.pop("config", None)
    values = load_yaml(config_file) if config_file else {}
    hints = _hints(cls)
    values.update({name: _from_flag(name, hints[name], raw) for name, raw in args.items()})
    return from_mapping(cls, values, origin=config_file or "config")


def config_error_line(prog: str, error: ConfigError) -> str:
    """The one line a job ends with: `prog: config error: field=value: fix`, newlines folded.

    A ConfigError raised in a Ray task arrives as Ray's dual exception (RayTaskError and ConfigError, the
    fields copied), whose own text is a traceback: the line is built from the fields instead.
    """
    cause = getattr(error, "cause", None)
    source = cause if isinstance(cause, ConfigError) else error
    line = f"{prog}: config error: {source.field}={source.value!r}: {source.fix}"
    return " ".join(line.split())


def exit_config_error(prog: str, error: ConfigError) -> NoReturn:
    """End the process with status 2 and the error's one line on stderr."""
    sys.stderr.write(config_error_line(prog, error) + "\n")
    sys.stderr.flush()
    raise SystemExit(2)


def parse(
    cls: type[T],
    argv: list[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
    required: tuple[str, ...] | list[str] = (),
    config_file: bool = True,
) -> T:
    """Parse `argv` into `cls`. Any configuration mistake exits with status 2 and one line, before any work."""
    parser = build_parser(cls, description, prog, required, config_file)
    args = vars(parser.parse_args(argv))
    try:
        return _config_from_args(cls, args)
    except ConfigError as error:
        exit_config_error(parser.prog, error)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def run_job(
    cls: type[T],
    run: typing.Callable[[T], Any],
    argv: list[str] | None,
    description: str | None,
    prog: str | None = None,
    required: tuple[str, ...] | list[str] = (),
    config_file: bool = True,
) -> Any:
    """Parse, log the config, run. A ConfigError, before or during the run, exits 2 with one line.

    `prog` is how the job is started (`python -m jobs.curate`), shown in --help and in every error;
    `required` names the fields --help lists as required; `config_file` False: no --config (see build_parser).
    """
    setup_logging()
    prog = prog or os.path.basename(sys.argv[0])
    config = parse(cls, argv, description, prog, required, config_file)
    logger.info("config: %s", json.dumps(to_dict(config), default=str, sort_keys=True))
    try:
        return run(config)
    except ConfigError as error:
        exit_config_error(prog, error)
